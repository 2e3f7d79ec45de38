"""The server's logger: client-supplied text is escaped and clipped before it reaches a log line.

A `model` name with a newline could otherwise write a forged line into the log (log forging), and a 100k-character
value would be written in full. Every argument of a record logged through `valora.server` is rendered printable:
control characters escaped (`\\n` as the two characters backslash and n), values over `MAX_VALUE_CHARS` clipped.
"""

from __future__ import annotations

import logging
import re

MAX_VALUE_CHARS = 300
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def printable(value: object, limit: int = MAX_VALUE_CHARS) -> str:
    text = str(value)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class _PrintableArgs(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(a if isinstance(a, (int, float)) else printable(a) for a in record.args)
        return True


logger = logging.getLogger("valora.server")
logger.addFilter(_PrintableArgs())
