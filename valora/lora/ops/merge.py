"""W' = W + s·B·A written into a separate buffer: the one pass a mode switch makes over a layer's weights.

The pass is memory-bound (rank r is small): each program streams one tile of W in, adds the rank-r product for
that tile (computed on tensor cores in fp32), and streams the tile of W' out, so a switch costs about the time
to read and write the targeted weights once. cuBLAS `addmm` with k = r reaches well under half the bandwidth on
these shapes, so on CUDA the Triton kernel is used; elsewhere `torch.addmm` computes the same thing.

A fused projection (qkv: three slices, gate/up: two) is one launch: the row tiles of all its slices form one grid
and each program finds its slice, its rank and its rows of A. A switch of Qwen2-VL-7B's all-linear adapter is 112
launches instead of 196, and the host work around each is a handful of integers (the switch was host-bound: a
k/v slice's tile pass takes about a microsecond of GPU time, less than its launch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from valora.lora.ops.configs import dot_block_r
from valora.lora.ops.jit import compiling

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional dependency on CPU
    triton = None

MAX_SLICES = 3  # q/k/v; gate/up is two and every other layer one


if triton is not None:

    @triton.jit(do_not_specialize=["r0", "r1", "r2", "end0", "end1", "tiles0", "tiles1"])
    def _merge_kernel(w_ptr, b_ptr, a_ptr, out_ptr, N, scale, stride_w, stride_b, stride_a, stride_out,
                      r0, r1, r2, end0, end1, end2, tiles0, tiles1, rmax,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        # which slice this row tile belongs to: tiles0 / tiles1 are the cumulative tile counts of slices 0 and 1
        j = (pid_m >= tiles0).to(tl.int32) + (pid_m >= tiles1).to(tl.int32)
        start = tl.where(j == 0, 0, tl.where(j == 1, end0, end1))
        end = tl.where(j == 0, end0, tl.where(j == 1, end1, end2))
        r = tl.where(j == 0, r0, tl.where(j == 1, r1, r2))
        tile = pid_m - tl.where(j == 0, 0, tl.where(j == 1, tiles0, tiles1))
        rm = start + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        mm, mn, mr = rm < end, rn < N, rr < r
        b = tl.load(b_ptr + rm[:, None] * stride_b + rr[None, :], mask=mm[:, None] & mr[None, :], other=0.0)
        a = tl.load(a_ptr + (j * rmax + rr)[:, None] * stride_a + rn[None, :], mask=mr[:, None] & mn[None, :],
                    other=0.0)
        w = tl.load(w_ptr + rm[:, None] * stride_w + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
            b, a = b.to(tl.float32), a.to(tl.float32)
        delta = tl.dot(b, a)
        out = w.to(tl.float32) + scale * delta
        tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class MergeTiles:
    """A merge program's tile of W (rows x columns) and its warps."""

    block_m: int
    block_n: int
    num_warps: int = 4


def merge_tiles(block_r: int) -> MergeTiles:
    """The tile a merge of rank tile `block_r` uses (`benchmarks/merge_tiles.py` times the alternatives)."""
    return MergeTiles(64, 128 if block_r <= 64 else 64)


def merge_into(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float,
               ranks: Sequence[int], slices: Sequence[int], rmax: int, tiles: MergeTiles | None = None) -> None:
    """out = w + scale·B_j·A_j for each row slice j of w (sizes `slices`, at most three): w, out [M, N] with
    M = sum(slices); b [M, >= max rank], slice j reading its first ranks[j] columns; a [len(slices)·rmax, N], slice
    j's A in rows j·rmax .. j·rmax + ranks[j]. A slice of rank 0 is copied. Views of larger stacks are fine.
    `tiles` overrides `merge_tiles` (the Triton kernel only)."""
    if len(slices) > MAX_SLICES or len(ranks) != len(slices):
        raise ValueError(f"one rank per slice, at most {MAX_SLICES} slices")
    use_triton = triton is not None and (w.is_cuda or INTERPRET) and w.stride(1) == 1 and out.stride(1) == 1
    if not use_triton:
        if not compiling():
            start = 0
            for j, (rows, r) in enumerate(zip(slices, ranks)):
                dst, src = out[start : start + rows], w[start : start + rows]
                if r:
                    torch.addmm(src, b[start : start + rows, :r], a[j * rmax : j * rmax + r], alpha=scale, out=dst)
                else:
                    dst.copy_(src)
                start += rows
        return
    block_r = dot_block_r(max(ranks))
    cfg = tiles or merge_tiles(block_r)
    block_m, block_n = cfg.block_m, cfg.block_n
    ends = [sum(slices[: j + 1]) for j in range(len(slices))]
    counts = [sum(triton.cdiv(s, block_m) for s in slices[: j + 1]) for j in range(len(slices))]
    pad = MAX_SLICES - len(slices)
    rs, ends, counts = list(ranks) + [0] * pad, ends + [ends[-1]] * pad, counts + [counts[-1]] * pad
    grid = (counts[-1], triton.cdiv(w.shape[1], block_n))
    args = (w, b, a, out, w.shape[1], float(scale), w.stride(0), b.stride(0), a.stride(0), out.stride(0),
            *rs, *ends, counts[0], counts[1], rmax)
    opts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, UPCAST=INTERPRET, num_warps=cfg.num_warps)
    if compiling():
        _merge_kernel.warmup(*args, grid=grid, **opts)
    else:
        _merge_kernel[grid](*args, **opts)
