"""The MLP GEMM with its activation in the epilogue (models/layers/gemm_kernels.py) against PyTorch's linear then
activation, in the interpreter on the CPU (fp32, fp16) and on a GPU (bf16 too): ragged M, N and K, gated and not,
with and without a bias; and the MLP layers take it only when enabled, for large passes without adapter work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from valora.models.layers import fused_kernels, gemm_kernels
from valora.models.layers.mlp import MLP, GatedMLP

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _reference(x, w, b, act):
    h = F.linear(x.float(), w.float(), None if b is None else b.float()).to(x.dtype)
    if act == "silu_and_mul":
        g, u = h.chunk(2, dim=-1)
        return F.silu(g) * u
    return ACT2FN[act](h)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", gemm_kernels.ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_matches_linear_then_activation(dtype, act, bias):
    torch.manual_seed(0)
    m, n, k = 37, 24, 40  # none a multiple of the interpreter's 16-wide tiles
    x = torch.randn(m, k, device=DEVICE).to(dtype)
    w = (torch.randn(2 * n if act == "silu_and_mul" else n, k, device=DEVICE) / k**0.5).to(dtype)
    b = torch.randn(w.shape[0], device=DEVICE).to(dtype) if bias else None
    got = gemm_kernels.linear_act(x, w, b, act)
    assert got.shape == (m, n) and got.dtype == dtype and got.stride(0) * got.element_size() % 16 == 0
    torch.testing.assert_close(got, _reference(x, w, b, act), **TOL[dtype])


def test_bad_inputs_are_refused():
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(ValueError, match="unknown activation"):
        gemm_kernels.linear_act(x, w, None, "relu")
    with pytest.raises(ValueError, match="do not pair"):
        gemm_kernels.linear_act(x, torch.randn(6, 9), None, "gelu")


@pytest.mark.parametrize("mlp_cls,act", [(MLP, "quick_gelu"), (MLP, "gelu"), (GatedMLP, "silu")])
def test_mlps_take_it_when_enabled_for_large_passes(monkeypatch, mlp_cls, act):
    torch.manual_seed(0)
    mlp = mlp_cls(16, 24, act, bias=True).to(DEVICE)
    for p in mlp.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(9, 16, device=DEVICE)
    ref = mlp(x, None)
    calls = []
    real = gemm_kernels.linear_act
    monkeypatch.setattr(gemm_kernels, "linear_act", lambda *a: calls.append(a[-1]) or real(*a))
    monkeypatch.setattr(fused_kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(gemm_kernels, "ENABLED", True)
    monkeypatch.setattr(gemm_kernels, "MIN_ROWS", 9)
    torch.testing.assert_close(mlp(x, None), ref, **TOL[torch.float32])
    assert calls == ["silu_and_mul" if act == "silu" else act]
    mlp(x[:8], None)  # too few rows
    monkeypatch.setattr(gemm_kernels, "ENABLED", False)
    mlp(x, None)
    assert len(calls) == 1
