"""`HeadParams`: what a request passes instead of `SamplingParams` to be answered by a task head."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadParams:
    """Answer with the adapter's head `head`; None picks the adapter's default head, else its only one."""

    head: str | None = None
