"""ATMM backend: segment-tiled shrink and expand whose tile shapes, warps, stages and split-K are chosen per input
shape from the tuned table (`valora.lora.tuning`), with a heuristic where no table exists."""

from __future__ import annotations

import torch

from valora.lora.ops import kernels
from valora.lora.ops.configs import Shape
from valora.lora.ops.meta import LoRAMeta
from valora.lora.tuning.table import choose


def lora_atmm(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
              scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    kernels.check_layout(x, stack_a, stack_b, out, slices)
    tokens, segments = meta.num_lora_tokens, meta.num_segments
    rows = stack_a.shape[1]
    shrink_cfg = choose("shrink", Shape(tokens, segments, x.shape[1], rows), x.device)
    expand_cfg = choose("expand", Shape(tokens, segments, stack_b.shape[2], stack_b.shape[1]), x.device)
    mid = kernels.intermediate(meta, x.shape[1], rows, shrink_cfg, x.device)
    kernels.shrink(x, meta, stack_a, ranks, mid, shrink_cfg)
    kernels.expand(mid, meta, stack_b, ranks, scalings, slices, out, expand_cfg)
