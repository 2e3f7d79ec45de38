"""Where an engine's start-up time goes, phase by phase.

A fresh GPU machine pays for everything at start-up: weight loading, the KV-cache profile run, Triton building every
LoRA kernel layout (engine/kernel_warmup.py), the decode and token-bucket graph captures and the vision warm-up.
Each grew with its own change, so the total alone (18 s, then 44 s on the H100, docs/benchmarks.md) cannot say
which one to look at; the "engine ready" line and `benchmarks/engine_speed.py` report every phase, and the seconds
Triton spent compiling within it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from valora.engine.host_pauses import COMPILES


class StartupPhases:
    """Wall seconds of each named start-up phase, in the order they ran, and Triton's synchronous build seconds
    within each (asynchronous builds show in their phase's own time). The device is synchronised at each phase's
    end so that queued work is charged to the phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}
        self.compile_seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, compiled = time.perf_counter(), COMPILES.seconds
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            if COMPILES.seconds > compiled:
                self.compile_seconds[name] = self.compile_seconds.get(name, 0.0) + COMPILES.seconds - compiled

    def total(self) -> float:
        """Seconds since the engine began starting."""
        return time.perf_counter() - self.started

    def report(self) -> dict[str, float]:
        """Every phase's seconds, "other" (what no phase covers: config, tokenizer, bookkeeping) and "total"."""
        total = self.total()
        return {**self.seconds, "other": max(total - sum(self.seconds.values()), 0.0), "total": total}

    def summary(self) -> str:
        """One line: the total, then each phase (Triton's build seconds in brackets where it built any)."""
        report = self.report()
        total = report.pop("total")
        parts = [f"{name.replace('_', ' ')} {s:.1f}"
                 + (f" (Triton builds {self.compile_seconds[name]:.1f})" if name in self.compile_seconds else "")
                 for name, s in report.items()]
        return f"{total:.1f} s: " + ", ".join(parts)
