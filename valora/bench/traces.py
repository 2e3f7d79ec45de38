"""The Azure LLM inference traces (2023) shipped with the package: arrival times and token counts.

The original VaLoRA harness replayed the same trace but cut it to its first 5 arrivals; here a whole window of
consecutive requests is replayed, its gaps rescaled so it lasts exactly as long as the target rate asks, which
keeps the trace's burstiness (the conversation trace's inter-arrival CV is about 1.1, the code trace's about 13).
Licence and citation: `traces/NOTICE`.
"""

from __future__ import annotations

import csv
import datetime
import functools
import gzip
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

TRACES = {"conv": "azure_llm_trace_conv_2023.csv.gz", "code": "azure_llm_trace_code_2023.csv.gz"}


@dataclass(frozen=True)
class Trace:
    name: str
    arrival_s: np.ndarray  # seconds after the first request, non-decreasing
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def rate(self) -> float:
        """Mean requests per second over the whole trace."""
        return (len(self) - 1) / float(self.arrival_s[-1] - self.arrival_s[0])

    def window(self, n: int, rate: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """`n` consecutive requests from a random start, as (arrival times rescaled to `rate`, their row indices).

        The window spans n gaps (up to the arrival of request n+1), scaled so that it lasts n / rate seconds:
        the mean rate is exact and the shape of the bursts is the trace's."""
        if n >= len(self):
            raise ValueError(f"{n} requests asked from the {self.name} trace, which has {len(self)}")
        start = int(rng.integers(0, len(self) - n))
        t = self.arrival_s[start:start + n + 1] - self.arrival_s[start]
        span = float(t[-1])
        if span <= 0:
            raise ValueError(f"the {self.name} trace has {n + 1} requests at one instant from row {start}")
        return t[:n] * (n / rate) / span, np.arange(start, start + n)


def _seconds(stamp: str) -> float:
    # The files carry 7 fractional digits; datetime takes at most 6.
    head, _, frac = stamp.partition(".")
    whole = datetime.datetime.fromisoformat(head).replace(tzinfo=datetime.timezone.utc)
    return whole.timestamp() + float("0." + (frac or "0"))


@functools.cache
def load_trace(name: str) -> Trace:
    """A shipped trace by name (`conv`, `code`), or a CSV file (optionally gzipped) with the same columns."""
    if name in TRACES:
        with resources.as_file(resources.files("valora.bench") / "traces" / TRACES[name]) as path:
            return _read(name, path)
    return _read(Path(name).stem, Path(name))


def _read(name: str, path: Path) -> Trace:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} holds no requests")
    t = np.array([_seconds(r["TIMESTAMP"]) for r in rows])
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    prompt = np.array([int(r["ContextTokens"]) for r in rows])[order]
    output = np.array([int(r["GeneratedTokens"]) for r in rows])[order]
    return Trace(name, t, prompt, output)
