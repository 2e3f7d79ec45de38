"""Where the host loses time that is no step's own work: Python's garbage collector, Triton building a kernel at
first use, and the CUDA allocator's retries. Each stalls the step loop, and with it every running stream, for as
long as it lasts.

In the end-to-end sweep on the H100 (docs/benchmarks.md) both policies' servers had steps of 0.7-2.8 s at 32-40
req/s with no graph capture and no mode switch in them. Three known causes fit: a full collection of a large heap
(the core holds the model's modules, the graphs, the block tables and every request's state); a kernel meeting an
argument combination it was never built for (Triton specialises integers and pointers on their divisibility, so a
new batch shape can mean a new build, 0.5-6 s); and a caching allocator that cannot serve a block, frees its whole
cache (synchronising the device, one cudaFree per segment) and retries. The engine core process moves its start-up
objects out of the collector's reach (`freeze_startup_heap`, as vLLM's engine core does), and each step record
says how long the collector ran and Triton compiled between the step's launch and its collection, and how many
allocator retries happened since the last slow step, so a stall's cause is read from the step log (`valora bench
costs`) instead of guessed. All are diagnostics: the cost model still learns a step's whole time, as the device
saw it.
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


class _Clock:
    """Seconds this process has spent in one kind of pause, summed (one clock per kind for the process, whatever
    the number of engines)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None


COLLECTIONS = _Clock()
COMPILES = _Clock()  # Triton building a kernel at first use: a step waits for it (0.5-6 s seen on the H100)

gc.callbacks.append(lambda phase, info: COLLECTIONS.start() if phase == "start" else COLLECTIONS.stop())


def _watch_triton_compiles() -> None:
    """Time every synchronous Triton compilation through its runtime hooks, which bracket it (the start-up's
    asynchronous builds, engine/kernel_warmup.py, happen before any step and are not of interest). Hooks set by
    someone else are kept and still called."""
    try:
        from triton import knobs
    except ImportError:  # no Triton (or one without knobs): nothing is compiled at run time
        return
    runtime = knobs.runtime
    before, after = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def on_miss(**kwargs):
        COMPILES.start()
        return before(**kwargs) if before is not None else None

    def on_built(**kwargs):
        COMPILES.stop()
        return after(**kwargs) if after is not None else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_miss, on_built


_watch_triton_compiles()


class HostPauses:
    """Seconds spent in garbage collections and Triton compilations within a step's window, and CUDA allocator
    retries since the last slow step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._retries = self._alloc_retries()

    @staticmethod
    def mark() -> tuple[float, float]:
        """The process's collection and compilation seconds so far: taken when a step is launched."""
        return COLLECTIONS.seconds, COMPILES.seconds

    def _alloc_retries(self) -> int:
        if self.device.type != "cuda":
            return 0
        return int(torch.cuda.memory_stats(self.device).get("num_alloc_retries", 0))

    def take(self, mark: tuple[float, float], step_s: float) -> tuple[float, float, int]:
        """(collection seconds, compilation seconds since `mark`, allocator retries) for a step of `step_s`
        collected now; retries are read after slow steps only, so a retry is counted at the first slow step after
        it, the step it slowed."""
        retries = 0
        if step_s >= SLOW_STEP_S:
            now = self._alloc_retries()
            retries, self._retries = now - self._retries, now
        return COLLECTIONS.seconds - mark[0], COMPILES.seconds - mark[1], retries
