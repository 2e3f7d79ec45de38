"""Compile-only mode: kernel calls inside `compile_only()` build their Triton configuration and launch nothing.

A server compiles at start-up every configuration its steps can pick (engine/kernel_warmup.py) instead of a step
stalling on Triton's JIT at first use (0.5-6 s per new set of configurations in a fresh server on the H100, the
largest stalls of the end-to-end sweep), and the tuner builds a round's candidates before it times them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

_active = False


@contextlib.contextmanager
def compile_only(ignore_errors: bool = False) -> Iterator[None]:
    """Within the block, the LoRA kernels (kernels.py, merge.py) compile and do not run, in parallel where this
    Triton offers asynchronous compilation; the block ends once all are built. With `ignore_errors` a
    configuration that fails to build is skipped (the tuner's candidates)."""
    global _active
    try:
        import triton
    except ImportError:  # pragma: no cover - no Triton, nothing to build
        triton = None
    mode = getattr(triton, "AsyncCompileMode", None)
    with contextlib.ExitStack() as stack:
        if mode is not None:
            pool = stack.enter_context(ThreadPoolExecutor(max_workers=os.cpu_count() or 4))
            stack.enter_context(mode(pool, ignore_errors=ignore_errors))
        saved, _active = _active, True
        try:
            yield
        finally:
            _active = saved


def compiling() -> bool:
    """Inside `compile_only()`: build kernels, launch none."""
    return _active
