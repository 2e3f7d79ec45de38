"""User-given paths checked before any filesystem call sees them.

A NUL byte makes `os.stat` raise a bare ValueError and an over-long path fails deep inside a resolve with
ENAMETOOLONG; neither says what was wrong with the request. Checked first, both get one clear message.
"""

from __future__ import annotations

import os
from pathlib import PurePath

PATH_MAX = 4096  # bytes, Linux's limit for a whole path
NAME_MAX = 255  # bytes, for one component


def check_path(path: str | os.PathLike, what: str = "path") -> str:
    """`path` as a string, or ValueError naming `what` and the problem."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ValueError(f"{what} must be a string")
    if "\0" in text:
        raise ValueError(f"{what} contains a NUL byte")
    size = len(text.encode("utf-8", "surrogateescape"))
    if size > PATH_MAX:
        raise ValueError(f"{what} is {size} bytes long, over the limit of {PATH_MAX}")
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in PurePath(text).parts):
        raise ValueError(f"{what} has a component longer than {NAME_MAX} bytes")
    return text
