"""The first GEMM of an MLP with its activation in the epilogue (Triton): one pass writes act(x Wᵀ + b) instead of
cuBLAS writing x Wᵀ + b and the activation kernel reading it back and writing again.

    linear_act(x, w, b, "quick_gelu")    -> quick_gelu(x Wᵀ + b)       CLIP's and Qwen2-VL's ViT MLPs
    linear_act(x, w, b, "gelu")          -> gelu(x Wᵀ + b) (erf form)  InternViT's
    linear_act(x, w, b, "silu_and_mul")  -> silu(g) * u for [g | u] = x Wᵀ + b, W = [W_gate; W_up]  SwiGLU MLPs

At a vision tower's sizes the activation is pure memory traffic: Qwen2-VL's quick_gelu over the 5120-wide fc1 output
of 32 images reads and writes 2 x 335 MB, about 0.2 ms a layer on an H100 next to 0.6 ms for the GEMM. Whether a
Triton GEMM with the activation fused beats cuBLAS plus the activation kernel is a measurement
(`python -m benchmarks.vision_tower` times both per family), so the path is off unless VALORA_GEMM_EPILOGUE=1, and
then only for passes of at least MIN_ROWS rows without adapter work (the layers check; LoRA adds its delta to the
GEMM's output before the activation).

Numerics follow the unfused path: the GEMM accumulates in fp32 and adds the bias, the sum is rounded to the output
type (what cuBLAS returns), and the activation rounds as fused_kernels' kernels (and transformers) do. Only the
GEMM's summation order differs from cuBLAS's.

Tiles: grouped row-major order over (BLOCK_M x BLOCK_N) output tiles so that GROUP_M row tiles share their weight
tiles in L2; on a GPU the first call per (act, N, K) times a few tile configurations and keeps the fastest (so call
it once eagerly before capturing a CUDA graph, as with every Triton kernel); in the interpreter one small tile.
"""

from __future__ import annotations

import os

import torch

from valora.models.layers import fused_kernels
from valora.models.layers.aligned import aligned_empty

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the CPU-only install without the triton extra
    triton = tl = None

ENABLED = os.environ.get("VALORA_GEMM_EPILOGUE", "0") == "1"
MIN_ROWS = 2048  # below this a pass is small enough that cuBLAS's choice of kernel matters more than the traffic
ACTS = ("quick_gelu", "gelu", "silu_and_mul")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried on the first call per shape; BLOCK_N is per half when gated
CONFIGS = ((128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 256, 64, 8, 3))
GATED_CONFIGS = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 8, 4))
INTERPRETER_CONFIG = (16, 16, 16, 4, 1)
GROUP_M = 8


def use_gemm_act(x: torch.Tensor) -> bool:
    """Whether an MLP over rows `x` takes linear_act (enabled, the fused kernels' device, enough rows)."""
    return ENABLED and fused_kernels.use_triton(x) and x.shape[0] >= MIN_ROWS


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _linear_act_kernel(
    x_ptr, w_ptr, b_ptr, o_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """o[m, n] = act(x[m] . w[n] + b[n]); gated (ACT 2): with g and u from rows n and N + n of w (and b)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]: w transposed
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = acc
    up = N * stride_wn  # the up rows of a gated weight
    for k in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        wk_mask = k_mask[:, None] & n_mask[None, :]
        acc = tl.dot(a, tl.load(w_ptrs, mask=wk_mask, other=0.0), acc, input_precision=DOT_PRECISION)
        if ACT == 2:
            acc_up = tl.dot(a, tl.load(w_ptrs + up, mask=wk_mask, other=0.0), acc_up, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    dt = o_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if ACT == 2:
            acc_up += tl.load(b_ptr + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    h = acc.to(dt).to(tl.float32)  # the GEMM's output as cuBLAS rounds it
    if ACT == 0:  # quick_gelu: x * sigmoid(1.702 x), each op rounded as transformers' QuickGELUActivation
        t = (h * 1.702).to(dt).to(tl.float32)
        s = (1.0 / (1.0 + tl.exp(-t))).to(dt).to(tl.float32)
        out = h * s
    elif ACT == 1:  # exact GELU, in fp32 and rounded once, as PyTorch's
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    else:  # silu(g) rounded to the type, times u: fused_kernels.silu_and_mul's rounding
        u = acc_up.to(dt).to(tl.float32)
        out = (h / (1.0 + tl.exp(-h))).to(dt).to(tl.float32) * u
    o_ptrs = o_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, out.to(dt), mask=m_mask[:, None] & n_mask[None, :])


_BEST: dict[tuple, tuple[int, int, int, int, int]] = {}  # (act, N, K, dtype) -> the fastest config measured


def _launch(x, w, b, out, act: str, n: int, config) -> None:
    bm, bn, bk, warps, stages = config
    m, k = x.shape
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _linear_act_kernel[grid](
        x, w, b if b is not None else w, out, m, n, k, x.stride(0), w.stride(0), out.stride(0),
        ACT=ACTS.index(act), HAS_BIAS=b is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=warps, num_stages=stages,
    )


def _config(x, w, b, out, act: str, n: int):
    if not x.is_cuda:
        return INTERPRETER_CONFIG
    key = (act, n, x.shape[1], x.dtype)
    if key not in _BEST:
        from triton.testing import do_bench

        times = {}
        for config in GATED_CONFIGS if act == "silu_and_mul" else CONFIGS:
            try:
                times[config] = do_bench(lambda c=config: _launch(x, w, b, out, act, n, c), warmup=5, rep=20)
            except Exception:  # noqa: BLE001 - a tile that does not fit this GPU's shared memory is skipped
                continue
        if not times:
            raise RuntimeError(f"no tile configuration of linear_act runs for {key}")
        _BEST[key] = min(times, key=times.get)
    return _BEST[key]


def linear_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: str) -> torch.Tensor:
    """act(x Wᵀ + b) for x [M, K] and W [N', K] (rows with a unit stride along K; N' = 2N for silu_and_mul, gate
    rows first): [M, N] in x's dtype, rows on 16-byte boundaries."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTS)}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"x {tuple(x.shape)} and weight {tuple(weight.shape)} do not pair")
    if x.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("x and weight need a unit stride along K")
    n = weight.shape[0] // 2 if act == "silu_and_mul" else weight.shape[0]
    out = aligned_empty((x.shape[0], n), x.dtype, x.device)
    if out.numel():
        _launch(x, weight, bias, out, act, n, _config(x, weight, bias, out, act, n))
    return out
