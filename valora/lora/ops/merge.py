"""W' = W + s·B·A written into a separate buffer: the one pass a mode switch makes over a layer's weights.

The pass is memory-bound (rank r is small): each program streams one tile of W in, adds the rank-r product for
that tile (computed on tensor cores in fp32), and streams the tile of W' out, so a switch costs about the time
to read and write the targeted weights once. cuBLAS `addmm` with k = r reaches well under half the bandwidth on
these shapes, so on CUDA the Triton kernel is used; elsewhere `torch.addmm` computes the same thing.
"""

from __future__ import annotations

import os

import torch

from valora.lora.ops.jit import compiling

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is an optional dependency on CPU
    triton = None


if triton is not None:

    @triton.jit
    def _merge_kernel(w_ptr, b_ptr, a_ptr, out_ptr, M, N, R, scale,
                      stride_w, stride_b, stride_a, stride_out,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, UPCAST: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rr = tl.arange(0, BLOCK_R)
        mm, mn, mr = rm < M, rn < N, rr < R
        b = tl.load(b_ptr + rm[:, None] * stride_b + rr[None, :], mask=mm[:, None] & mr[None, :], other=0.0)
        a = tl.load(a_ptr + rr[:, None] * stride_a + rn[None, :], mask=mr[:, None] & mn[None, :], other=0.0)
        w = tl.load(w_ptr + rm[:, None] * stride_w + rn[None, :], mask=mm[:, None] & mn[None, :], other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong; fp32 operands are exact there
            b, a = b.to(tl.float32), a.to(tl.float32)
        delta = tl.dot(b, a)
        out = w.to(tl.float32) + scale * delta
        tl.store(out_ptr + rm[:, None] * stride_out + rn[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mm[:, None] & mn[None, :])

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def merge_into(out: torch.Tensor, w: torch.Tensor, b: torch.Tensor, a: torch.Tensor, scale: float) -> None:
    """out = w + scale * b @ a; w, out [M, N], b [M, r], a [r, N] (row-major rows; views of larger stacks are fine)."""
    use_triton = triton is not None and (w.is_cuda or INTERPRET) and w.stride(1) == 1 and out.stride(1) == 1
    if not use_triton:
        if not compiling():
            torch.addmm(w, b, a, alpha=scale, out=out)
        return
    m, n = w.shape
    r = a.shape[0]
    block_r = max(16, triton.next_power_of_2(r))
    block_m, block_n = (64, 128) if block_r <= 64 else (64, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    args = (w, b, a, out, m, n, r, float(scale), w.stride(0), b.stride(0), a.stride(0), out.stride(0))
    opts = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, UPCAST=INTERPRET, num_warps=4)
    if compiling():
        _merge_kernel.warmup(*args, grid=grid, **opts)
    else:
        _merge_kernel[grid](*args, **opts)
