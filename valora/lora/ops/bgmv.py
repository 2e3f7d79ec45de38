"""BGMV baseline (Punica decode style): one program per (token, slice, split), no sorting, every adapter padded
to the stack's max rank as Punica and vLLM do.

Each program gathers its token's adapter by index and runs a GEMV as broadcast-multiply-and-sum (no tensor-core
tiles). Tiles are those of Punica's Triton BGMV as ported to vLLM and LoRAX: shrink BLOCK_K=256, SPLIT_K=64,
8 warps, the whole padded rank in one block; expand BLOCK_N=256, SPLIT_N=64 (the largest power of two up to 64
dividing the width), 8 warps. Rows past a slot's rank are read and computed like the padding they stand for,
then dropped with `where`, so garbage there cannot leak.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from valora.lora.ops import kernels
from valora.lora.ops.kernels import token_adapter
from valora.lora.ops.meta import LoRAMeta

SHRINK_BLOCK_K, SHRINK_SPLIT_K = 256, 64
EXPAND_BLOCK_N, EXPAND_MAX_SPLIT_N = 256, 64
NUM_WARPS = 8


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, a_ptr, mid_ptr, ids_ptr, ranks_ptr, K, R,
    stride_xm, stride_aslot, stride_arow, stride_mid, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_k = tl.program_id(0)
    t = tl.program_id(1)
    j = tl.program_id(2)
    slot, rank = token_adapter(ids_ptr, ranks_ptr, t, j, stride_rank)
    if slot < 0:
        return
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    a_rows = a_ptr + slot.to(tl.int64) * stride_aslot + (j * R + offs_r)[:, None] * stride_arow
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_ptr + t * stride_xm + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        at = tl.load(a_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(at * xt[None, :], axis=1)
    acc = tl.where(offs_r < rank, acc, 0.0)
    out = mid_ptr + t * stride_mid + j * R + offs_r
    if SPLIT_K > 1:
        tl.atomic_add(out, acc, mask=r_ok)
    else:
        tl.store(out, acc, mask=r_ok)


@triton.jit
def _bgmv_expand_kernel(
    mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, R, w0, w1, w2,
    stride_mid, stride_bslot, stride_brow, stride_ym, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
):
    pid_sn = tl.program_id(0)
    t = tl.program_id(1)
    j = tl.program_id(2)
    slot, rank = token_adapter(ids_ptr, ranks_ptr, t, j, stride_rank)
    if slot < 0:
        return
    width = tl.where(j == 2, w2, tl.where(j == 1, w1, w0))
    offset = tl.where(j == 2, w0 + w1, tl.where(j == 1, w0, 0))
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    keep = offs_r < rank
    m = tl.load(mid_ptr + t * stride_mid + j * R + offs_r, mask=r_ok, other=0.0)
    scale = tl.load(scal_ptr + slot)
    per_split = tl.cdiv(width, SPLIT_N)
    n_lo = pid_sn * per_split
    n_hi = tl.minimum(n_lo + per_split, width)
    b_slot = b_ptr + slot.to(tl.int64) * stride_bslot
    for n in range(n_lo, n_hi, BLOCK_N):
        cols = n + tl.arange(0, BLOCK_N)
        c_ok = cols < n_hi
        bt = tl.load(b_slot + (offset + cols)[:, None] * stride_brow + offs_r[None, :],
                     mask=c_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.where(keep[None, :], bt.to(tl.float32), 0.0)
        acc = tl.sum(bt * m[None, :], axis=1)
        y = y_ptr + t * stride_ym + offset + cols
        prev = tl.load(y, mask=c_ok, other=0.0)
        tl.store(y, (prev.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=c_ok)


def _split_n(width: int) -> int:
    split = EXPAND_MAX_SPLIT_N
    while width % split:
        split //= 2
    return split


def lora_bgmv(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
              scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    kernels.check_layout(x, stack_a, stack_b, out, slices)
    T, K = x.shape
    R = stack_b.shape[2]
    n_slices = len(slices)
    block_r = triton.next_power_of_2(R)
    mid = meta.scratch(T * n_slices * R, torch.float32, x.device).view(T, n_slices * R)
    mid.zero_()
    _bgmv_shrink_kernel[(SHRINK_SPLIT_K, T, n_slices)](
        x, stack_a, mid, meta.ids, ranks, K, R,
        x.stride(0), stack_a.stride(0), stack_a.stride(1), mid.stride(0), ranks.stride(0),
        BLOCK_R=block_r, BLOCK_K=SHRINK_BLOCK_K, SPLIT_K=SHRINK_SPLIT_K, num_warps=NUM_WARPS,
    )
    w = kernels.slice_widths(slices)
    split_n = _split_n(max(slices))
    _bgmv_expand_kernel[(split_n, T, n_slices)](
        mid, stack_b, out, meta.ids, ranks, scalings, R, *w,
        mid.stride(0), stack_b.stride(0), stack_b.stride(1), out.stride(0), ranks.stride(0),
        BLOCK_R=block_r, BLOCK_N=EXPAND_BLOCK_N, SPLIT_N=split_n, num_warps=NUM_WARPS,
    )
