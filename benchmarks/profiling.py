"""Where one run of a function spends its time, in a few compact tables (what a GPU run's log tail can hold).

`profile_run(fn, phases=...)` runs `fn` once under torch.profiler (CPU, and CUDA where there is one) and once under
cProfile, after the caller's warm-up, and returns a JSON-able summary:

- wall time vs GPU busy time (the union of kernel and copy intervals), the GPU window (first kernel start to last
  kernel end), and the idle gaps inside it: what the device waits for the host;
- kernels by category (GEMM, attention, norm, rotary, activation, copies...) and the top kernels by total time,
  with counts;
- host phases: the calls named in `phases` (object, attribute, label), wrapped in profiler ranges for this run only
  (nothing is left patched), each with its calls and inclusive host time;
- the top host ops by self time (aten ops and CUDA runtime calls: a copy that synchronises shows up here) and the top
  Python functions by own time (cProfile of a second run: launch overheads, host preparation).

`format_profile(summary, title)` prints it in about 2 KB.
"""

from __future__ import annotations

import contextlib
import cProfile
import functools
import pstats
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from benchmarks.common import synchronize

# (category, substrings of kernel names) in the order they are tried; names are lower-cased first
KERNEL_CATEGORIES = (
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk", "_matmul")),
    ("attention", ("attention", "attn", "fmha", "flash", "varlen", "_prefill_kernel", "_decode", "cudnn")),
    ("norm", ("norm",)),
    ("rotary", ("rotary",)),
    ("activation", ("gelu", "silu", "sigmoid", "_act")),
    ("memcpy", ("memcpy", "memset")),
    ("copy/index", ("copy", "index", "cat", "gather", "fill", "elementwise", "reduce")),
)
TOP = 8  # rows per table


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def busy_time(intervals: Sequence[tuple[float, float]]) -> tuple[float, list[float]]:
    """Length of the union of (start, end) intervals and the gaps between its pieces, in the intervals' unit."""
    busy, gaps, cur_s, cur_e = 0.0, [], None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
                gaps.append(s - cur_e)
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        busy += cur_e - cur_s
    return busy, gaps


@contextlib.contextmanager
def annotated(phases: Sequence[tuple[object, str, str]]) -> Iterator[list[str]]:
    """Wraps each `getattr(obj, attr)` in a profiler range named `label` while the block runs; yields the labels of
    those that exist (a phase the code no longer has is skipped, not an error)."""
    saved, labels = [], []
    for obj, attr, label in phases:
        fn = getattr(obj, attr, None)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _label=label, **kwargs):
            with torch.profiler.record_function(_label):
                return _fn(*args, **kwargs)

        saved.append((obj, attr, obj.__dict__.get(attr) if hasattr(obj, "__dict__") else None))
        setattr(obj, attr, functools.wraps(fn)(wrapper))
        labels.append(label)
    try:
        yield labels
    finally:
        for obj, attr, original in reversed(saved):
            if original is None:
                delattr(obj, attr)  # the wrapper shadowed a class attribute: uncover it
            else:
                setattr(obj, attr, original)


def profile_run(fn: Callable[[], object], phases: Sequence[tuple[object, str, str]] = (),
                setup: Callable[[], object] | None = None) -> dict:
    """One profiled call of `fn` (warm it up first), summarised; see the module docstring. `setup` runs before
    each call, outside what is measured."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with annotated(phases) as labels:
        if setup is not None:
            setup()
        synchronize()
        with profile(activities=activities) as prof:
            t = time.perf_counter()
            fn()
            synchronize()
            wall_us = (time.perf_counter() - t) * 1e6
    events = prof.events()
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    busy, gaps = busy_time([(e.time_range.start, e.time_range.end) for e in device])
    window = max((e.time_range.end for e in device), default=0) - min((e.time_range.start for e in device), default=0)
    kernels: dict[str, list[float]] = {}
    categories: dict[str, list[float]] = {}
    for e in device:
        us = e.time_range.end - e.time_range.start
        for table, key in ((kernels, e.name), (categories, kernel_category(e.name))):
            row = table.setdefault(key, [0, 0.0])
            row[0] += 1
            row[1] += us
    label_set = set(labels)
    phase_rows: dict[str, list[float]] = {label: [0, 0.0] for label in labels}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name in label_set:
            phase_rows[e.name][0] += 1
            phase_rows[e.name][1] += e.cpu_time_total
    host_ops = [(a.key, a.count, a.self_cpu_time_total) for a in prof.key_averages()
                if a.device_type == DeviceType.CPU and a.key not in label_set]
    host_ops.sort(key=lambda r: -r[2])

    def table(rows: dict[str, list[float]], n: int | None = TOP) -> list[dict]:
        ordered = sorted(rows.items(), key=lambda kv: -kv[1][1])
        return [{"name": k, "count": int(c), "ms": us / 1e3} for k, (c, us) in ordered[:n]]

    return {
        "wall_ms": wall_us / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_window_ms": window / 1e3,
        "gpu_kernels": len(device),
        "gpu_gaps": {"count_over_20us": sum(g > 20 for g in gaps), "ms": sum(gaps) / 1e3,
                     "largest_ms": sorted((g / 1e3 for g in gaps), reverse=True)[:3]},
        "categories": table(categories, None),
        "kernels": table(kernels),
        "phases": [{"name": k, "count": int(c), "ms": us / 1e3} for k, (c, us) in phase_rows.items()],
        "host_ops": [{"name": k, "count": c, "ms": us / 1e3} for k, c, us in host_ops[:TOP]],
        "python": python_profile(fn, setup),
    }


def python_profile(fn: Callable[[], object], setup: Callable[[], object] | None = None, top: int = TOP
                   ) -> list[dict]:
    """The Python functions with the most own time in one more call of `fn` (cProfile)."""
    if setup is not None:
        setup()
    prof = cProfile.Profile()
    synchronize()
    prof.enable()
    fn()
    synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, func): (prim calls, calls, tottime, cumtime, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [{"name": f"{'/'.join(file.split('/')[-2:])}:{line}({func})" if line else func, "count": calls,
             "ms": tottime * 1e3} for (file, line, func), (_, calls, tottime, _, _) in rows]


def format_profile(summary: dict, title: str) -> str:
    """The summary as compact tables (names clipped to fit one line each)."""
    s = summary
    busy = s["gpu_busy_ms"]
    gaps = s["gpu_gaps"]
    lines = [f"-- profile: {title}",
             f"wall {s['wall_ms']:.2f} ms | GPU busy {busy:.2f} ms ({100 * busy / max(s['wall_ms'], 1e-9):.0f}% of "
             f"wall), window {s['gpu_window_ms']:.2f} ms, {s['gpu_kernels']} kernels/copies | gaps "
             f"{gaps['ms']:.2f} ms ({gaps['count_over_20us']} over 20 us; largest "
             + ", ".join(f"{g:.2f}" for g in gaps["largest_ms"]) + " ms)"]

    def rows(name: str, items: list[dict], share_of: float | None = None, width: int = 62) -> None:
        if not items:
            return
        lines.append(f"  {name}")
        for r in items:
            share = f" {100 * r['ms'] / share_of:5.1f}%" if share_of else ""
            lines.append(f"    {r['name'][:width]:{width}s} {r['count']:6d} {r['ms']:9.3f} ms{share}")

    rows("GPU by category (count, total, share of busy)", s["categories"], busy or None)
    rows("top kernels", s["kernels"], busy or None)
    rows("host phases (calls, inclusive host time)", s["phases"])
    rows("host ops by self time", s["host_ops"])
    rows("python by own time (cProfile, 2nd run)", s["python"])
    return "\n".join(lines)
