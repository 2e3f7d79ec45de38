"""The vision pass (tower and projector) replayed from CUDA graphs, so that a step with one image costs the tower's
kernels and not its ~25 launches per block.

A graph is captured per *bucket* (`VisionPass.key`): the pass's rows padded up to a fixed size (Qwen2-VL: a
multiple of 256 patches; CLIP and InternViT: 1, 2, 3, 4, 6, 8, ... images or tiles) and its span tables padded to
powers of two. Padding rows are spans of their own, so they never touch a real row; a replay refills the static
inputs (pixels, positions, orders, span tables) and returns the real rows. A graph is captured the first time its
bucket comes up (after two eager runs: Triton compiles, cuBLAS picks its kernels), all in one memory pool.

Passes a graph cannot serve run eagerly with the same kernels: an adapter that reaches the vision side (its LoRA
work depends on the batch), an adapter merged into vision layers, more rows than `max_rows`, and attention backends
whose launches depend on the span lengths (TORCH_SDPA groups spans by length; FLEX_ATTENTION compiles). With
`capture=False` (`--enforce-eager`) the padded passes run eagerly: the numbers a graph would compute.
"""

from __future__ import annotations

import logging
import time

import torch

from valora.models.cuda_graph import capture_graph

logger = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 4096  # launch overhead stops mattering beyond a few thousand rows per pass


class VisionGraphs:
    def __init__(self, model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS, capture: bool = True) -> None:
        self.model, self.max_rows, self.capture = model, max_rows, capture
        self.graphs: dict[tuple, tuple | None] = {}  # None: capture failed, the bucket runs eagerly
        self.pool = None
        self.capture_seconds = 0.0

    def fits(self, rows: int) -> bool:
        return rows <= self.max_rows

    def run(self, vp) -> torch.Tensor:
        """Embeddings of the real rows of a padded `VisionPass` (a new tensor: the graph's output is reused)."""
        key = (vp.spans[0].backend, *vp.key)
        if not self.capture:
            return self.model.run_vision(vp)[: vp.out_rows]
        if key not in self.graphs:
            self.graphs[key] = self._capture(vp)
        entry = self.graphs[key]
        if entry is None:
            return self.model.run_vision(vp)[: vp.out_rows]
        static, graph, out = entry
        for dst, src in zip(static.tensors(), vp.tensors()):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        return out[: vp.out_rows].clone()

    def _capture(self, vp) -> tuple | None:
        start = time.perf_counter()
        static = vp.with_tensors([t.clone() for t in vp.tensors()])
        try:
            graph, out = capture_graph(lambda: self.model.run_vision(static), static.tensors()[0].device, self.pool)
        except RuntimeError as e:  # a backend that cannot be captured: keep serving, eagerly
            logger.warning("vision pass bucket %s runs eagerly: capture failed (%s)", vp.key, e)
            return None
        if self.pool is None:
            self.pool = graph.pool()
        self.capture_seconds += time.perf_counter() - start
        logger.info("captured the vision pass for bucket %s in %.2f s", vp.key, time.perf_counter() - start)
        return static, graph, out
