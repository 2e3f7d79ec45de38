"""Fused Triton kernels for the small per-layer ops of the decoder, and the switch between them and PyTorch.

A decode step's weights take a few ms to read; around them each layer used to launch ~40 tiny PyTorch kernels
(RMSNorm in fp32, rotary, SiLU*mul, residual adds), which cost as much again even inside a CUDA graph. Here each
of those groups is one launch:

    rms_norm(x, w, eps)               -> w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)
    rms_norm(x, w, eps, residual)     -> (that of s, s) with s = x + residual (the residual add fused in)
    layer_norm(x, w, b, eps[, residual]) -> LayerNorm, the same way (the vision towers' norm)
        ... residual, scale)          -> s = residual + scale * x: a layer scale (InternViT's lambda) fused in too
    silu_and_mul(gate_up [T, 2I])     -> silu(gate) * up  [T, I], gate first
    quick_gelu(x)                     -> x * sigmoid(1.702 x) (CLIP's and Qwen2-VL's ViT MLPs: three ops in PyTorch)
    rotary_qk(q, k, positions, ...)   -> q, k rotated (neox rotate_half), cos/sin computed inline from the
                                         positions [3, T] or [T], inv_freq and the M-RoPE section of each frequency;
                                         fp32=True rotates in float32 and rounds once (the vision towers' 2D RoPE)

Every kernel rounds where the PyTorch path rounds (the reference is the op sequence in norm.py, mlp.py and
rotary.py, i.e. Hugging Face's): fp32 results are the same up to the order of a sum and the last ulp of
rsqrt/exp/cos; fp16/bf16 ones within one rounding of the narrow type.

Dispatch: the layers ask `use_triton(t)` (this module's attribute, looked up at call time, so tests can
monkeypatch it to force the kernels on CPU under TRITON_INTERPRET=1). It is true for CUDA tensors when Triton
imports and VALORA_FUSED_OPS is not "0". The kernels are CUDA-graph safe: outputs are allocated with
torch.empty, grids come from shapes only, nothing reads device memory on the host. Each kernel compiles on its
first call per shape class, so capture a graph only after an eager warm-up step (as with every Triton kernel).
"""

from __future__ import annotations

import os

import torch

from valora.models.layers.aligned import aligned_empty

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - the CPU-only install without the triton extra
    triton = tl = None
    HAS_TRITON = False

ENABLED = os.environ.get("VALORA_FUSED_OPS", "1") != "0"


def use_triton(x: torch.Tensor) -> bool:
    """Whether ops on `x` take the fused Triton kernels (CUDA tensor, Triton importable, not disabled)."""
    return ENABLED and HAS_TRITON and x.is_cuda


def _jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, last dim] with a unit stride along the last dim (a view where possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 or x2.shape[-1] == 1 else x2.contiguous()


# ---------------------------------------------------------------------------------------------------- RMSNorm


@_jit
def _residual_add(x_ptr, r_ptr, s_ptr, rout_ptr, row, cols, mask, stride_x, stride_r, stride_rout,
                  HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The row of x, or of residual + scale * x (stored as the new residual), each op rounded as PyTorch's."""
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        if HAS_SCALE:
            x = (x.to(tl.float32) * tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(rout_ptr + row * stride_rout + cols, x, mask=mask)
    return x


@_jit
def _rms_norm_kernel(
    x_ptr, r_ptr, s_ptr, w_ptr, out_ptr, rout_ptr, N, eps,
    stride_x, stride_r, stride_out, stride_rout,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = _residual_add(x_ptr, r_ptr, s_ptr, rout_ptr, row, cols, mask, stride_x, stride_r, stride_rout,
                      HAS_RESIDUAL, HAS_SCALE)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / N
    h = (xf * tl.rsqrt(var + eps)).to(x.dtype)  # cast back BEFORE the weight (Qwen2/Llama order)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * h.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _norm_call(kernel, x: torch.Tensor, params: tuple, eps: float, residual: torch.Tensor | None,
               scale: torch.Tensor | None, out_dtype: torch.dtype):
    """Shared launcher of the two norms: checks, outputs, one program per row."""
    n = x.shape[-1]
    for p in (*params, scale):
        if p is not None and p.shape != (n,):
            raise ValueError(f"a norm parameter of shape {tuple(p.shape)} for rows of {n}")
    if scale is not None and residual is None:
        raise ValueError("a layer scale only applies with a residual")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} does not match x "
                             f"{tuple(x.shape)} {x.dtype}")
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out if residual is None else (out, res_out)
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    ro2 = res_out.view(-1, n) if res_out is not None else x2
    o2 = out.view(-1, n)
    block = triton.next_power_of_2(n)
    kernel[(x2.shape[0],)](
        x2, r2, scale if scale is not None else x2, *params, o2, ro2, n, float(eps),
        x2.stride(0), r2.stride(0), o2.stride(0), ro2.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_SCALE=scale is not None, BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out if residual is None else (out, res_out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             scale: torch.Tensor | None = None):
    """RMSNorm over the last dim; with `residual`, (norm(s), s) for s = residual + x (x scaled by `scale` first,
    when given). New tensors, inputs kept."""
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    return _norm_call(_rms_norm_kernel, x, (weight,), eps, residual, scale, out_dtype)


# ------------------------------------------------------------------------------------------------ LayerNorm


@_jit
def _layer_norm_kernel(
    x_ptr, r_ptr, s_ptr, w_ptr, b_ptr, out_ptr, rout_ptr, N, eps,
    stride_x, stride_r, stride_out, stride_rout,
    HAS_RESIDUAL: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = _residual_add(x_ptr, r_ptr, s_ptr, rout_ptr, row, cols, mask, stride_x, stride_r, stride_rout,
                      HAS_RESIDUAL, HAS_SCALE)
    # PyTorch's layer_norm: statistics and the affine map in fp32, one rounding at the end
    xf = x.to(tl.float32)
    mean = tl.sum(xf, axis=0) / N
    diff = tl.where(mask, xf - mean, 0.0)
    var = tl.sum(diff * diff, axis=0) / N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = diff * tl.rsqrt(var + eps) * w + b
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               residual: torch.Tensor | None = None, scale: torch.Tensor | None = None):
    """LayerNorm over the last dim (weight and bias both given), in x's dtype; `residual` and `scale` as rms_norm."""
    return _norm_call(_layer_norm_kernel, x, (weight, bias), eps, residual, scale, x.dtype)


# ---------------------------------------------------------------------------------------------- SiLU and mul


@_jit
def _silu_and_mul_kernel(x_ptr, out_ptr, N, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + N + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)  # silu rounded to the input type, as F.silu returns it
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


SILU_BLOCK = 1024


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> [..., I]: silu(gate_up[..., :I]) * gate_up[..., I:]."""
    two_i = gate_up.shape[-1]
    if two_i % 2:
        raise ValueError(f"gate_up's last dim {two_i} is not even")
    inter = two_i // 2
    # rows on 16-byte boundaries: the down projection's GEMM reads this (layers/aligned.py)
    out = aligned_empty((*gate_up.shape[:-1], inter), gate_up.dtype, gate_up.device)
    if out.numel() == 0:
        return out
    x2, o2 = _rows(gate_up), out.view(-1, inter)
    block = min(SILU_BLOCK, triton.next_power_of_2(inter))
    grid = (x2.shape[0], triton.cdiv(inter, block))
    _silu_and_mul_kernel[grid](x2, o2, inter, x2.stride(0), o2.stride(0), BLOCK=block,
                               num_warps=max(1, min(8, block // 256)))
    return out


@_jit
def _quick_gelu_kernel(x_ptr, out_ptr, N, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    dt = x.dtype
    xf = x.to(tl.float32)
    # x * sigmoid(1.702 * x), each of the three ops rounded to x's type as transformers' QuickGELUActivation
    t = (xf * 1.702).to(dt).to(tl.float32)
    s = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (xf * s).to(dt), mask=mask)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x), elementwise, one pass."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n = x.shape[-1]
    x2, o2 = _rows(x), out.view(-1, n)
    block = min(SILU_BLOCK, triton.next_power_of_2(n))
    _quick_gelu_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, o2, n, x2.stride(0), o2.stride(0), BLOCK=block,
                                                             num_warps=max(1, min(8, block // 256)))
    return out


# ------------------------------------------------------------------------------------------------- Rotary


@_jit
def _rotary_qk_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, inv_freq_ptr, axis_ptr, NQ, NK, HALF,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot, stride_koh, stride_pos,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP32: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_D)
    dmask = i < HALF
    # angle of frequency i: the position on its M-RoPE axis times inv_freq[i], all in fp32 like the PyTorch path
    axis = tl.load(axis_ptr + i, mask=dmask, other=0)
    pos = tl.load(pos_ptr + axis * stride_pos + t, mask=dmask, other=0)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + i, mask=dmask, other=0.0)
    cos = tl.cos(angle)[None, :]
    sin = tl.sin(angle)[None, :]

    is_q = heads < NQ
    is_k = (heads >= NQ) & (heads < NQ + NK)
    qh = tl.minimum(heads, NQ - 1)[:, None]
    kh = tl.maximum(heads - NQ, 0)[:, None]
    mq = is_q[:, None] & dmask[None, :]
    mk = is_k[:, None] & dmask[None, :]
    qp = q_ptr + t * stride_qt + qh * stride_qh + i[None, :]
    kp = k_ptr + t * stride_kt + kh * stride_kh + i[None, :]
    x1 = tl.load(qp, mask=mq, other=0.0) + tl.load(kp, mask=mk, other=0.0)
    x2 = tl.load(qp + HALF, mask=mq, other=0.0) + tl.load(kp + HALF, mask=mk, other=0.0)
    dt = x1.dtype
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    # x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1)
    if FP32:  # all in fp32, one rounding at the end (x.float() first, as the vision towers do)
        o1 = (x1f * cos - x2f * sin).to(dt)
        o2 = (x2f * cos + x1f * sin).to(dt)
    else:  # each product and the sum rounded to x's type, as PyTorch does with cos/sin already cast to it
        c = cos.to(dt).to(tl.float32)
        s = sin.to(dt).to(tl.float32)
        o1 = ((x1f * c).to(dt).to(tl.float32) - (x2f * s).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2f * c).to(dt).to(tl.float32) + (x1f * s).to(dt).to(tl.float32)).to(dt)
    qop = qo_ptr + t * stride_qot + qh * stride_qoh + i[None, :]
    kop = ko_ptr + t * stride_kot + kh * stride_koh + i[None, :]
    tl.store(qop, o1, mask=mq)
    tl.store(qop + HALF, o2, mask=mq)
    tl.store(kop, o1, mask=mk)
    tl.store(kop + HALF, o2, mask=mk)


def _rotary_block_h(tokens: int) -> int:
    """Heads per program: few at decode (more programs for one token), more at prefill (fewer, fatter ones)."""
    return 4 if tokens < 64 else 16


def rotary_qk(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
              axis: torch.Tensor, fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, D], k [T, Hk, D] (any strides with unit stride along D) -> new contiguous rotated q and k.

    positions: [A, T] (M-RoPE: A axes) or [T], integer; inv_freq [D/2] fp32; axis [D/2] integer: frequency i
    takes its position from row axis[i] (all zeros for plain RoPE). fp32: rotate in float32, round once."""
    t, nq, d = q.shape
    nk = k.shape[1]
    if k.shape[0] != t or k.shape[2] != d or k.dtype != q.dtype or d % 2:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} do not pair")
    half = d // 2
    if inv_freq.shape != (half,) or axis.shape != (half,):
        raise ValueError(f"inv_freq / axis must have head_dim/2 = {half} entries")
    if positions.shape[-1] != t:
        raise ValueError(f"positions {tuple(positions.shape)} for {t} tokens")
    q_out = torch.empty((t, nq, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((t, nk, d), dtype=k.dtype, device=k.device)
    if t == 0:
        return q_out, k_out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.stride(-1) != 1:
        positions = positions.contiguous()
    stride_pos = positions.stride(0) if positions.shape[0] > 1 else 0
    block_h = _rotary_block_h(t)
    grid = (t, triton.cdiv(nq + nk, block_h))
    _rotary_qk_kernel[grid](
        q, k, q_out, k_out, positions, inv_freq, axis, nq, nk, half,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1), stride_pos,
        BLOCK_H=block_h, BLOCK_D=triton.next_power_of_2(half), FP32=fp32, num_warps=4,
    )
    return q_out, k_out
