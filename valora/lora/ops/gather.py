"""Gather backend: index every token's adapter weights and use batched matmuls (padded to the max rank), the
gather+BMM baseline of Punica's micro-benchmark. Memory grows as tokens x rank x (K + width)."""

from __future__ import annotations

import torch

from valora.lora.ops.meta import LoRAMeta


def lora_gather(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
                scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    if meta.sizes is not None:
        raise ValueError("this backend needs the host layout; CUDA graphs run atmm, sgmv or bgmv")
    rows = meta.token_order
    slot = meta.ids.index_select(0, rows).long()  # [T_lora]
    xs = x.index_select(0, rows).unsqueeze(2)  # [T_lora, K, 1]
    rmax = stack_b.shape[2]
    r_idx = torch.arange(rmax, device=x.device)
    scale = scalings.index_select(0, slot)[:, None]
    col = 0
    for j, width in enumerate(slices):
        keep = r_idx[None, :] < ranks[j].index_select(0, slot)[:, None]  # [T_lora, R]
        a = stack_a[slot, j * rmax : (j + 1) * rmax]  # [T_lora, R, K]
        # Rows past the rank may hold garbage (even NaN): each only reaches its own entry of `mid`, dropped here.
        mid = torch.where(keep, torch.bmm(a, xs).squeeze(2).float() * scale, 0.0).to(x.dtype)
        b = stack_b[slot, col : col + width].masked_fill_(~keep[:, None, :], 0)  # [T_lora, width, R], a copy
        delta = torch.bmm(b, mid.unsqueeze(2)).squeeze(2)
        out[:, col : col + width].index_add_(0, rows, delta.to(out.dtype))
        col += width
