"""ATMM backend: each call runs by the plan the tuned table gives its shape (`valora.lora.tuning`), with a
heuristic where no table exists: one fused shrink+expand kernel, or segment-tiled shrink and expand whose tile
shapes, warps, stages and split-K were measured together."""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

from valora.lora.ops import kernels
from valora.lora.ops.configs import CallShape
from valora.lora.ops.meta import LoRAMeta
from valora.lora.tuning.table import choose, reject


def lora_atmm(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
              scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    kernels.check_layout(x, stack_a, stack_b, out, slices)
    call = CallShape(meta.num_lora_tokens, meta.num_segments, x.shape[1], stack_b.shape[2], slices)
    plan = choose(call, x.device, x.dtype)
    try:
        kernels.run(plan, x, meta, stack_a, stack_b, ranks, scalings, slices, out)
    except OutOfResources as err:  # raised when the kernel loads, before it runs: `out` is untouched
        fallback = reject(call, x.device, x.dtype, err)
        if fallback == plan:
            raise
        kernels.run(fallback, x, meta, stack_a, stack_b, ranks, scalings, slices, out)
