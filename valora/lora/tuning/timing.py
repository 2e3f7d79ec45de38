"""Cold-cache GPU timing shared by the tuner and the operator benchmark.

Before every timed call a buffer twice the L2 size is read (reduced), so the call reads its weights from HBM as
it would inside a model step, not from the cache the previous repetition warmed; reading rather than writing
leaves no dirty lines whose write-back the timed call would pay for. A spin kernel ahead of the repetitions,
sized from the host time one repetition takes to enqueue, lets the host queue them all first: device time is
measured without launch gaps (as inside a CUDA graph), whatever the Python overhead of the call. Each call is
bracketed by CUDA events; the median over repetitions is returned.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch


@functools.cache
def _flush_buffer(device: torch.device) -> torch.Tensor:
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.ones(max(2 * l2, 64 << 20) // 4, dtype=torch.float32, device=device)


def gpu_time_us(fn: Callable[[], object], *, reps: int = 20, warmup: int = 3, device: torch.device | None = None,
                budget_ms: float = 40.0) -> float:
    """Median device time of `fn()` in microseconds, with L2 flushed before each repetition; slow calls get fewer
    repetitions (at least 5) so that one measurement takes about `budget_ms` of device time."""
    device = torch.device(device or torch.cuda.current_device())
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    flush = _flush_buffer(device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    host = time.perf_counter()
    flush.sum()
    fn()
    host_us = (time.perf_counter() - host) * 1e6
    torch.cuda.synchronize(device)
    reps = max(5, min(reps, int(budget_ms * 1e3 / ((time.perf_counter() - host) * 1e6))))
    cycles_per_us = torch.cuda.get_device_properties(device).clock_rate / 1000
    torch.cuda._sleep(int(reps * (1.5 * host_us + 10) * cycles_per_us))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        flush.sum()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return 1000.0 * statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))
