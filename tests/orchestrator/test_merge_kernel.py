"""The merge pass W' = W + s·B·A (Triton; the interpreter on CPU) equals torch.addmm on ragged shapes, reading
only the first r columns of B and rows of A (the rest of a slot may hold anything)."""

from __future__ import annotations

import pytest
import torch

from valora.lora.ops.merge import merge_into


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("m,n,r,rmax", [(37, 50, 7, 16), (130, 70, 16, 32), (64, 200, 33, 64)])
def test_merge_matches_addmm(dtype, tol, m, n, r, rmax):
    g = torch.Generator().manual_seed(m * n + r)
    w = torch.randn(m, n, generator=g).to(dtype)
    b_stack = torch.full((m, rmax), float("nan"), dtype=dtype)  # garbage past the rank must not leak in
    a_stack = torch.full((rmax, n), float("nan"), dtype=dtype)
    b_stack[:, :r] = (torch.randn(m, r, generator=g) * 0.3).to(dtype)
    a_stack[:r] = (torch.randn(r, n, generator=g) * 0.3).to(dtype)
    out = torch.full_like(w, float("nan"))
    merge_into(out, w, b_stack[:, :r], a_stack[:r], 1.7)
    ref = (w.double() + 1.7 * b_stack[:, :r].double() @ a_stack[:r].double()).to(dtype)
    assert torch.isfinite(out).all()
    assert (out.double() - ref.double()).norm() / ref.double().norm() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_bf16_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3584, 3584, generator=g, device="cuda").bfloat16()
    b = (torch.randn(3584, 64, generator=g, device="cuda") * 0.02).bfloat16()
    a = (torch.randn(64, 3584, generator=g, device="cuda") * 0.02).bfloat16()
    out = torch.empty_like(w)
    merge_into(out, w, b, a, 2.0)
    ref = w.float() + 2.0 * b.float() @ a.float()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
