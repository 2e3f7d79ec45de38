"""Gather backend: index every token's adapter weights and use batched matmuls (padded to the max rank), the
gather+BMM baseline of Punica's micro-benchmark. Memory grows as tokens x rank x (K + width), so tokens go in
chunks of bounded size."""

from __future__ import annotations

import torch

from valora.lora.ops.meta import LoRAMeta

# Tokens are gathered in chunks of at most this many bytes of per-token weights: a prefill of thousands of tokens
# at rank 64 would otherwise gather tens of GB (the baseline's arithmetic, with its memory bounded).
GATHER_BYTES = 256 << 20


def lora_gather(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
                scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    rmax = stack_b.shape[2]
    per_token = rmax * (x.shape[1] + max(slices)) * x.element_size()  # the gathered A and B of one token
    chunk = max(1, GATHER_BYTES // per_token)
    # Positions of `token_order` past the step's adapter tokens (a CUDA graph's padding) must add nothing; their
    # count is on the device (the last segment start), so shapes stay fixed and nothing waits for the host.
    real = meta.seg_starts[-1]
    for start in range(0, meta.num_lora_tokens, chunk):
        rows = meta.token_order[start : start + chunk]
        valid = torch.arange(start, start + rows.shape[0], device=x.device) < real
        _gather_chunk(x, meta.ids, rows, valid, stack_a, stack_b, ranks, scalings, slices, out)


def _gather_chunk(x, ids, rows, valid, stack_a, stack_b, ranks, scalings, slices, out) -> None:
    slot = ids.index_select(0, rows).long().clamp_min(0)  # [T_lora]
    xs = x.index_select(0, rows).unsqueeze(2)  # [T_lora, K, 1]
    rmax = stack_b.shape[2]
    r_idx = torch.arange(rmax, device=x.device)
    scale = scalings.index_select(0, slot)[:, None]
    col = 0
    for j, width in enumerate(slices):
        keep = (r_idx[None, :] < ranks[j].index_select(0, slot)[:, None]) & valid[:, None]  # [T_lora, R]
        a = stack_a[slot, j * rmax : (j + 1) * rmax]  # [T_lora, R, K]
        # Rows past the rank may hold garbage (even NaN): each only reaches its own entry of `mid`, dropped here.
        mid = torch.where(keep, torch.bmm(a, xs).squeeze(2).float() * scale, 0.0).to(x.dtype)
        b = stack_b[slot, col : col + width].masked_fill_(~keep[:, None, :], 0)  # [T_lora, width, R], a copy
        delta = torch.bmm(b, mid.unsqueeze(2)).squeeze(2)
        out[:, col : col + width].index_add_(0, rows, delta.to(out.dtype))
        col += width
