"""Where the host loses time that is no step's own work: Python's garbage collector and the CUDA allocator's
retries. Both stall the step loop, and with it every running stream, for as long as they last.

In the end-to-end sweep on the H100 (docs/benchmarks.md) both policies' servers had steps of 0.7-2.8 s at 32-40
req/s with no graph capture and no mode switch in them. Two known causes fit: a full collection of a large heap
(the core holds the model's modules, the graphs, the block tables and every request's state), and a caching
allocator that cannot serve a block, frees its whole cache (synchronising the device, one cudaFree per segment) and
retries. The engine core process moves its start-up objects out of the collector's reach (`freeze_startup_heap`,
as vLLM's engine core does), and each step record says how long the collector ran between the step's launch and
its collection and how many allocator retries happened since the last slow step, so a stall's cause is read from
the step log (`valora bench costs`) instead of guessed. Both are diagnostics: the cost model still learns a
step's whole time, as the device saw it.
"""

from __future__ import annotations

import gc
import time

import torch

# Steps at least this long read the allocator's counters (the read costs tens of microseconds; a retry costs far
# more than this, so a step with one is never shorter).
SLOW_STEP_S = 0.05


def freeze_startup_heap() -> None:
    """Collect once, then leave every object alive now (model, graphs, tables) out of later collections: a full
    collection then walks only what serving allocated since."""
    gc.collect()
    gc.freeze()


class _Collections:
    """Seconds this process has spent in garbage collections (one callback for the process, whatever the number
    of engines)."""

    seconds = 0.0
    _start = 0.0

    @classmethod
    def on_gc(cls, phase: str, info: dict) -> None:
        if phase == "start":
            cls._start = time.perf_counter()
        else:
            cls.seconds += time.perf_counter() - cls._start


gc.callbacks.append(_Collections.on_gc)


class HostPauses:
    """Seconds spent in garbage collections within a step's window, and CUDA allocator retries since the last slow
    step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._retries = self._alloc_retries()

    @staticmethod
    def mark() -> float:
        """The process's collection seconds so far: taken when a step is launched."""
        return _Collections.seconds

    def _alloc_retries(self) -> int:
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def take(self, mark: float, step_s: float) -> tuple[float, int]:
        """(collection seconds since `mark`, allocator retries) for a step of `step_s` collected now; retries are
        read after slow steps only, so a retry is counted at the first slow step after it, the step it slowed."""
        retries = 0
        if step_s >= SLOW_STEP_S:
            now = self._alloc_retries()
            retries, self._retries = now - self._retries, now
        return _Collections.seconds - mark, retries
