"""The offline profiler: for every shape of the grid, time the configuration space on this GPU and keep the fastest.

The search has two grids per shape: every tile shape and split-K (`space.tile_grid`) at the default warps and
stages, then every (warps, stages) pair for the two fastest tiles (`space.schedule_grid`), re-timed with more
repetitions so that the final choice is stable between runs. Kernels of a shape are compiled in parallel before
they are timed when Triton offers asynchronous compilation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import triton

from valora.lora.ops import kernels
from valora.lora.ops.configs import Shape, TileConfig, heuristic
from valora.lora.ops.meta import LoRAMeta
from valora.lora.tuning import space
from valora.lora.tuning.timing import gpu_time_us

logger = logging.getLogger(__name__)

Measure = Callable[[str, Shape, TileConfig, int], float]
Prepare = Callable[[str, Shape, Iterable[TileConfig]], None]
Launch = Callable[[TileConfig, bool], None]


@dataclass(frozen=True)
class Result:
    op: str
    shape: Shape
    config: TileConfig
    us: float
    heuristic_us: float


class Problems:
    """Random inputs for one shape at a time (the previous shape's tensors are dropped), and their launches."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        self.dtype, self.device, self.seed = dtype, device, seed
        self._key: tuple[str, Shape] | None = None
        self._launch: Launch | None = None

    def launcher(self, op: str, shape: Shape) -> Launch:
        if self._key != (op, shape):
            self._launch = None  # free the last shape's buffers first
            self._launch = self._build(op, shape)
            self._key = (op, shape)
        assert self._launch is not None
        return self._launch

    def _build(self, op: str, shape: Shape) -> Launch:
        perm = torch.randperm(shape.tokens, generator=torch.Generator().manual_seed(self.seed))
        meta = LoRAMeta.build((torch.arange(shape.tokens) % shape.segments)[perm].tolist(), self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed)

        def rand(*size: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.randn(*size, generator=g, device=self.device, dtype=dtype) * 0.1

        if op == "shrink":
            x, stack_a = rand(shape.tokens, shape.k), rand(shape.segments, shape.n, shape.k)
            ranks = torch.full((1, shape.segments), shape.n, dtype=torch.int32, device=self.device)

            def launch_shrink(cfg: TileConfig, warmup: bool) -> None:
                mid = kernels.intermediate(meta, shape.k, shape.n, cfg, self.device)
                kernels.shrink(x, meta, stack_a, ranks, mid, cfg, warmup=warmup)

            return launch_shrink
        mid = rand(1, shape.tokens, shape.k, dtype=torch.float32)
        stack_b, out = rand(shape.segments, shape.n, shape.k), rand(shape.tokens, shape.n)
        ranks = torch.full((1, shape.segments), shape.k, dtype=torch.int32, device=self.device)
        scalings = torch.ones(shape.segments, dtype=torch.float32, device=self.device)
        return lambda cfg, warmup: kernels.expand(mid, meta, stack_b, ranks, scalings, (shape.n,), out, cfg,
                                                  warmup=warmup)

    def compile(self, op: str, shape: Shape, configs: Iterable[TileConfig]) -> None:
        """Compile every config for `shape` in parallel, where this Triton can (timing then finds them built)."""
        launch = self.launcher(op, shape)
        mode = getattr(triton, "AsyncCompileMode", None)
        if mode is None:
            return
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool, mode(pool, ignore_errors=True):
            for cfg in configs:
                with contextlib.suppress(Exception):  # a config that cannot compile is skipped when timed
                    launch(cfg, True)

    def measure(self, op: str, shape: Shape, cfg: TileConfig, reps: int) -> float:
        launch = self.launcher(op, shape)
        try:
            return gpu_time_us(lambda: launch(cfg, False), reps=reps, warmup=1, device=self.device)
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: never the fastest
            logger.debug("config %s failed for %s %s: %s", cfg, op, shape, err)
            return math.inf


def tune_shape(op: str, shape: Shape, measure: Measure, prepare: Prepare = lambda op, shape, configs: None, *,
               reps: int = 5, final_reps: int = 20, finalists: int = 2) -> TileConfig:
    """The fastest config for one shape: the tile grid, then warps x stages for the best `finalists` tiles."""
    tiles = space.tile_grid(op, shape)
    prepare(op, shape, tiles)
    first = {cfg: measure(op, shape, cfg, reps) for cfg in tiles}
    best_tiles = sorted(first, key=first.__getitem__)[:finalists]
    schedules = [cfg for tile in best_tiles for cfg in space.schedule_grid(tile)]
    prepare(op, shape, schedules)
    final = {cfg: measure(op, shape, cfg, final_reps) for cfg in schedules}
    return min(final, key=final.__getitem__)


def tune(shapes: dict[str, list[Shape]], problems: Problems, num_sms: int, *, reps: int = 5,
         final_reps: int = 20, progress: Callable[[Iterable], Iterable] = iter,
         on_result: Callable[[list[Result]], None] = lambda results: None) -> list[Result]:
    """Tune every shape, smallest token counts first; `on_result` sees the results so far after each shape."""
    results: list[Result] = []
    order = sorted(((op, s) for op, group in shapes.items() for s in group), key=lambda e: (e[1].tokens, e[0]))
    for op, shape in progress(order):
        best = tune_shape(op, shape, problems.measure, problems.compile, reps=reps, final_reps=final_reps)
        us = problems.measure(op, shape, best, final_reps)
        base = problems.measure(op, shape, heuristic(op, shape, num_sms), final_reps)
        results.append(Result(op, shape, best, us, base))
        on_result(results)
    return results
