"""Gather backend: index every token's adapter weights and use batched matmuls (padded to the max rank)."""

from __future__ import annotations

import torch

from valora.lora.ops.meta import LoRAMeta


def lora_gather(x, meta: LoRAMeta, stack_a, stack_b, ranks, scalings, slices, out) -> None:
    if meta.empty:
        return
    rows = meta.token_order
    slot = meta.ids.index_select(0, rows).long()  # [T_lora]
    xs = x.index_select(0, rows)
    rmax = stack_b.shape[2]
    r_idx = torch.arange(rmax, device=x.device)
    col = 0
    for j, width in enumerate(slices):
        a = stack_a[slot, j * rmax : (j + 1) * rmax]  # [T, R, K]
        b = stack_b[slot, col : col + width]  # [T, width, R]
        mask = (r_idx[None, :] < ranks[j].index_select(0, slot)[:, None]).to(torch.float32)
        mid = torch.bmm(a.float(), xs.float().unsqueeze(2)).squeeze(2) * mask  # [T, R]
        mid = mid * scalings.index_select(0, slot)[:, None]
        # Garbage beyond the rank in B must not leak in: zero it through the mask on `mid` and on B itself.
        b = b.float() * mask[:, None, :]
        delta = torch.bmm(b, mid.unsqueeze(2)).squeeze(2)
        out[rows, col : col + width] += delta.to(out.dtype)
        col += width
