"""The offline profiler: for every call shape of the grid, time the plans on this GPU and keep the fastest.

The search per shape, in three rounds (`tune_call`):
1. each kernel of the split path alone: every shrink tile and split-K, every expand tile, row kernels included;
2. whole calls: for every split-K, its fastest shrink with the fastest expands of its kind (the expand pays for
   every partial sum it adds, which the shrink alone never sees, so split-K is chosen with the expand in the
   measurement), the row pairs also as one launch, and every fused tile shape and column split;
3. the best plans under every (warps, stages) pair, re-timed with more repetitions next to the heuristic's plan and
   the previous table's plan for the shape, so the new choice is never slower than the one it replaces.
Kernels of a round are compiled in parallel before they are timed when Triton offers asynchronous compilation.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from valora.lora.ops import kernels
from valora.lora.ops.configs import CallShape, Plan, TileConfig, heuristic_plan
from valora.lora.ops.jit import compile_only
from valora.lora.ops.meta import LoRAMeta
from valora.lora.tuning import space
from valora.lora.tuning.table import ConfigTable
from valora.lora.tuning.timing import gpu_time_us

logger = logging.getLogger(__name__)

Candidate = Plan | tuple[str, TileConfig]  # a whole call, or one kernel of the split path alone
Measure = Callable[[CallShape, Candidate, int], float]
Prepare = Callable[[CallShape, Iterable[Candidate]], None]
Launch = Callable[[Candidate], None]


@dataclass(frozen=True)
class Result:
    shape: CallShape
    plan: Plan
    us: float
    heuristic_us: float
    previous: Plan | None  # the previous table's plan for the shape
    previous_us: float | None


class Problems:
    """Random inputs for one call shape at a time (the previous shape's tensors are dropped), and their launches:
    every adapter at the stack's full rank, tokens spread evenly over the adapters in random order."""

    def __init__(self, dtype: torch.dtype, device: torch.device, seed: int = 0) -> None:
        self.dtype, self.device, self.seed = dtype, device, seed
        self._shape: CallShape | None = None
        self._launch: Launch | None = None

    def launcher(self, shape: CallShape) -> Launch:
        if self._shape != shape:
            self._launch = None  # free the last shape's buffers first
            self._launch = self._build(shape)
            self._shape = shape
        assert self._launch is not None
        return self._launch

    def _build(self, shape: CallShape) -> Launch:
        perm = torch.randperm(shape.tokens, generator=torch.Generator().manual_seed(self.seed))
        meta = LoRAMeta.build((torch.arange(shape.tokens) % shape.segments)[perm].tolist(), self.device)
        g = torch.Generator(device=self.device).manual_seed(self.seed)

        def rand(*size: int, dtype: torch.dtype = self.dtype) -> torch.Tensor:
            return torch.randn(*size, generator=g, device=self.device, dtype=dtype) * 0.1

        rows = len(shape.slices) * shape.rank
        x, out = rand(shape.tokens, shape.k), rand(shape.tokens, shape.width)
        stack_a, stack_b = rand(shape.segments, rows, shape.k), rand(shape.segments, shape.width, shape.rank)
        ranks = torch.full((len(shape.slices), shape.segments), shape.rank, dtype=torch.int32, device=self.device)
        scalings = torch.ones(shape.segments, dtype=torch.float32, device=self.device)
        mid = rand(1, shape.tokens, rows, dtype=torch.float32)  # the expand alone reads one partial sum

        def launch(candidate: Candidate) -> None:
            if isinstance(candidate, Plan):
                kernels.run(candidate, x, meta, stack_a, stack_b, ranks, scalings, shape.slices, out)
            elif candidate[0] == "shrink":
                buf = kernels.intermediate(meta, shape.k, rows, candidate[1], self.device)
                kernels.shrink(x, meta, stack_a, ranks, buf, candidate[1])
            else:
                kernels.expand(mid, meta, stack_b, ranks, scalings, shape.slices, out, candidate[1])

        return launch

    def compile(self, shape: CallShape, candidates: Iterable[Candidate]) -> None:
        """Compile every candidate in parallel, where this Triton can (timing then finds them built)."""
        launch = self.launcher(shape)
        with compile_only(ignore_errors=True):
            for candidate in candidates:
                with contextlib.suppress(Exception):  # a candidate that cannot compile is skipped when timed
                    launch(candidate)

    def measure(self, shape: CallShape, candidate: Candidate, reps: int) -> float:
        launch = self.launcher(shape)
        try:
            return gpu_time_us(lambda: launch(candidate), reps=reps, warmup=1, device=self.device)
        except Exception as err:  # noqa: BLE001 - e.g. out of shared memory: never the fastest
            logger.debug("%s failed for %s: %s", candidate, shape, err)
            return math.inf


def tune_call(shape: CallShape, measure: Measure, prepare: Prepare = lambda shape, candidates: None, *,
              previous: Plan | None = None, num_sms: int = 132, reps: int = 5, final_reps: int = 20,
              finalists: int = 2) -> dict[Plan, float]:
    """The final round's times (us) of every plan it re-timed for `shape`; the fastest is the choice. The
    heuristic's plan and `previous` are always among them."""
    alone: list[Candidate] = [("shrink", c) for c in space.tile_grid("shrink", shape.op_shape("shrink"))]
    alone += [("expand", c) for c in space.tile_grid("expand", shape.op_shape("expand"))]
    prepare(shape, alone)
    first = {c: measure(shape, c, reps) for c in alone}
    ranked = sorted(first, key=first.__getitem__)
    # The fastest shrink of every (kind, split-K), each with the fastest expands of its kind (row or tile kernels).
    shrinks: dict[tuple[bool, int], TileConfig] = {}
    for op, cfg in ranked:
        if op == "shrink":
            shrinks.setdefault((cfg.block_m == 1, cfg.split_k), cfg)
    expands = {row: [cfg for op, cfg in ranked if op == "expand" and (cfg.block_m == 1) == row][:finalists]
               for row in (False, True)}
    plans = [Plan(shrink=s, expand=e) for (row, _), s in shrinks.items() for e in expands[row]]
    plans += [p.as_one_launch() for p in plans if p.shrink.block_m == 1]
    plans += [Plan(fused=c) for c in space.fused_grid(shape)]
    prepare(shape, plans)
    second = {p: measure(shape, p, reps) for p in plans}
    best = sorted(second, key=second.__getitem__)[:finalists]
    final_set = {q for p in best for q in space.plan_schedules(p, shape)} | set(best)
    final_set |= {heuristic_plan(shape, num_sms)} | ({previous} if previous is not None else set())
    prepare(shape, final_set)
    return {p: measure(shape, p, final_reps) for p in final_set}


def tune(shapes: list[CallShape], problems: Problems, num_sms: int, *, previous: ConfigTable | None = None,
         reps: int = 5, final_reps: int = 20, time_limit_s: float | None = None,
         progress: Callable[[Iterable], Iterable] = iter,
         on_result: Callable[[list[Result]], None] = lambda results: None) -> list[Result]:
    """Tune every shape, smallest token counts first, starting none after `time_limit_s`; `on_result` sees the
    results so far after each shape."""
    results: list[Result] = []
    start = time.perf_counter()
    for shape in progress(sorted(shapes, key=lambda s: (s.tokens, s.segments, s.k, s.width, s.rank))):
        if time_limit_s is not None and time.perf_counter() - start >= time_limit_s:
            break
        before = previous.lookup(shape) if previous is not None else None
        final = tune_call(shape, problems.measure, problems.compile, previous=before, num_sms=num_sms, reps=reps,
                          final_reps=final_reps)
        plan = min(final, key=final.__getitem__)
        results.append(Result(shape, plan, final[plan], final[heuristic_plan(shape, num_sms)], before,
                              final[before] if before is not None else None))
        on_result(results)
    return results
