"""SGMV baseline (Punica/S-LoRA prefill style): the same segment kernels with one fixed tile configuration and
the authors' grid of (segment x tiles of the longest segment), whatever the input shape.

Tiles are those of Punica's Triton SGMV as ported to vLLM and LoRAX: shrink BLOCK_M=32, BLOCK_N=16,
BLOCK_K=32, SPLIT_K=8; expand BLOCK_M=32, BLOCK_N=32, BLOCK_K=16; Triton's default 4 warps and 3 stages.
"""

from __future__ import annotations

import torch

from valora.lora.ops import kernels
from valora.lora.ops.configs import TileConfig
from valora.lora.ops.meta import LoRAMeta

SHRINK = TileConfig(block_m=32, block_n=16, block_k=32, num_warps=4, num_stages=3, split_k=8)
EXPAND = TileConfig(block_m=32, block_n=32, block_k=16, num_warps=4, num_stages=3)


def lora_sgmv(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
              scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    kernels.check_layout(x, stack_a, stack_b, out, slices)
    mid = kernels.intermediate(meta, x.shape[1], stack_a.shape[1], SHRINK, x.device)
    kernels.shrink(x, meta, stack_a, ranks, mid, SHRINK, seg_grid=True)
    kernels.expand(mid, meta, stack_b, ranks, scalings, slices, out, EXPAND, seg_grid=True)
