"""The one exception type for a user's mistakes (kept free of heavy imports: the CLI needs it before torch)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


class UserError(ValueError):
    """Something the user asked for that cannot work: a bad flag, path, input or adapter. Its message says what is
    wrong and what to do; the CLI prints it as one line and exits 2 (a traceback is for bugs)."""


def from_mapping(cls, raw: Any, where: str, error: type[UserError] = UserError):
    """`cls(**raw)` for a dataclass read from a config file, with a one-line error naming the unknown, missing or
    malformed key of `where` (a typo in a YAML file is a user's mistake, not a TypeError traceback)."""
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping, got {type(raw).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise error(f"{where}: unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except (TypeError, ValueError) as e:
        raise error(f"{where}: {e}") from e
