"""The merge pass W' = W + s·B·A (Triton; the interpreter on CPU) equals torch.addmm on ragged shapes, reading
only the first r columns of B and rows of A (the rest of a slot may hold anything), for one slice and for the
slices of a fused projection in one launch (ragged, rank 0 copied)."""

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
    merge_into(out, w, b_stack, a_stack, 1.7, [r], [m], rmax)
    ref = (w.double() + 1.7 * b_stack[:, :r].double() @ a_stack[:r].double()).to(dtype)
    assert torch.isfinite(out).all()
    assert (out.double() - ref.double()).norm() / ref.double().norm() < tol


@pytest.mark.parametrize("slices,ranks", [((37, 20, 20), (7, 0, 5)), ((64, 70), (16, 16)), ((20, 84, 9), (0, 3, 16))])
def test_fused_slices_merge_in_one_launch(slices, ranks):
    g = torch.Generator().manual_seed(sum(slices))
    m, n, rmax = sum(slices), 50, 16
    w = torch.randn(m, n, generator=g)
    b = torch.full((m, rmax), float("nan"))
    a = torch.full((len(slices) * rmax, n), float("nan"))
    ref, start = w.double().clone(), 0
    for j, (rows, r) in enumerate(zip(slices, ranks)):
        b[start : start + rows, :r] = torch.randn(rows, r, generator=g) * 0.3
        a[j * rmax : j * rmax + r] = torch.randn(r, n, generator=g) * 0.3
        ref[start : start + rows] += 0.5 * b[start : start + rows, :r].double() @ a[j * rmax : j * rmax + r].double()
        start += rows
    out = torch.full_like(w, float("nan"))
    merge_into(out, w, b, a, 0.5, ranks, slices, rmax)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # a rank-0 slice is a copy, to the bit
    start = 0
    for rows, r in zip(slices, ranks):
        if r == 0:
            assert torch.equal(out[start : start + rows], w[start : start + rows])
        start += rows


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_merge_bf16_on_gpu():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(3584, 3584, generator=g, device="cuda").bfloat16()
    b = (torch.randn(3584, 64, generator=g, device="cuda") * 0.02).bfloat16()
    a = (torch.randn(64, 3584, generator=g, device="cuda") * 0.02).bfloat16()
    out = torch.empty_like(w)
    merge_into(out, w, b, a, 2.0, [64], [3584], 64)
    ref = w.float() + 2.0 * b.float() @ a.float()
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
