"""The vision towers' attention over packed spans (layers/vit.py): the Triton varlen kernel (the interpreter on CPU)
and every other backend against plain per-span attention, with head sizes that are not powers of two, spans of
unequal lengths, strided q/k/v and the padded tables of a CUDA-graph bucket."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from valora.models.layers import attention_kernels
from valora.models.layers.vit import VisionSpans, vit_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 dots are wrong in the interpreter: CPU runs fp32 and fp16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKENDS = ["TORCH_SDPA", "TRITON_ATTN"] + (["FLASH_ATTN", "FLEX_ATTENTION"] if DEVICE == "cuda" else [])


def _reference(q, k, v, lengths):
    """Each span attends to itself, in fp32, one SDPA call per span."""
    outs, start = [], 0
    for n in lengths:
        qs, ks, vs = (t[start : start + n].float().transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))
        start += n
    return torch.cat(outs)


def _qkv(rows: int, heads: int, d: int, dtype, seed: int = 0):
    """q, k, v as a ViT has them: strided views of one fused qkv output [rows, 3, heads, d]."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(rows, 3, heads, d, generator=g).to(DEVICE, dtype)
    return qkv[:, 0], qkv[:, 1], qkv[:, 2]


def _tol(dtype, backend):
    return 2e-3 if backend == "FLEX_ATTENTION" and dtype == torch.float32 else TOL[dtype]  # flex: tf32 dots


SPANS = {
    "one-row-and-tile-edges": [1, 63, 64, 65, 33],
    "qwen-frames-and-windows": [64, 64, 48, 16, 130],
    "long-span": [300, 7, 520],  # >= 512 rows: the tall (128-row) tiles on GPUs
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [80, 40, 64])  # 80: Qwen2-VL's ViT (64 + 16 columns); 40: 32 + 16 with 8 masked
@pytest.mark.parametrize("spans", list(SPANS))
def test_varlen_kernel_matches_per_span_attention(dtype, d, spans):
    lengths = SPANS[spans]
    if DEVICE == "cpu" and spans == "long-span":
        pytest.skip("tall tiles are for fp16/bf16 on a GPU; in the interpreter they are slow")
    q, k, v = _qkv(sum(lengths), 3, d, dtype)
    got = vit_attention(q, k, v, VisionSpans.build(lengths, "TRITON_ATTN", q.device, dtype, d))
    torch.testing.assert_close(got.float(), _reference(q, k, v, lengths), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backends_agree(backend, dtype):
    if backend == "FLASH_ATTN" and dtype == torch.float32:
        pytest.skip("FlashAttention takes fp16/bf16 only")
    lengths = [40, 40, 40, 17, 100, 5]
    q, k, v = _qkv(sum(lengths), 2, 80, dtype, seed=1)
    got = vit_attention(q, k, v, VisionSpans.build(lengths, backend, q.device, dtype, 80))
    assert got.shape == q.shape and got.dtype == dtype
    tol = _tol(dtype, backend)
    torch.testing.assert_close(got.float(), _reference(q, k, v, lengths), atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("TRITON_ATTN", "FLASH_ATTN")])
def test_padded_tables_give_the_same_rows(backend):
    """A graph bucket's tables (more spans, a larger max length) leave every row's output as it was."""
    dtype = torch.float16
    lengths = [20, 70, 9]
    q, k, v = _qkv(sum(lengths), 2, 80, dtype, seed=2)
    plain = VisionSpans.build(lengths, backend, q.device, dtype, 80)
    padded = VisionSpans.build(lengths, backend, q.device, dtype, 80, num_spans=8, max_len=128)
    if backend == "TRITON_ATTN":
        bm = padded.block_m
        assert padded.tiles.shape == (-(-sum(lengths) // bm) + 8, 4)
        assert (padded.tiles[plain.tiles.shape[0] :, 1] == 0).all()  # unused entries hold no rows
    else:
        assert padded.cu_seqlens.tolist() == [0, 20, 90, 99] + [99] * 5 and padded.max_len == 128
    torch.testing.assert_close(vit_attention(q, k, v, padded), vit_attention(q, k, v, plain), atol=0, rtol=0)


def test_span_without_keys_gives_zeros():
    """Tiles whose span has no keys (the kernel's padding case) write zeros, not NaN."""
    q, k, v = _qkv(10, 2, 16, torch.float32)
    tiles = torch.tensor([[0, 6, 0, 6], [6, 4, 6, 0], [0, 0, 0, 0]], dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan")).contiguous()
    attention_kernels.varlen_attention(q, k, v, tiles, 16**-0.5, out, 32)
    assert torch.equal(out[6:], torch.zeros_like(out[6:]))
    torch.testing.assert_close(out[:6], _reference(q[:6], k[:6], v[:6], [6]), atol=2e-5, rtol=2e-5)


def test_bad_inputs_are_named():
    q, k, v = _qkv(8, 2, 16, torch.float32)
    tiles = torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="one shape"):
        attention_kernels.varlen_attention(q, k[:4], v, tiles, 1.0, torch.empty_like(q), 32)
    with pytest.raises(ValueError, match="do not fit"):
        VisionSpans.build([1, 2, 3], "TRITON_ATTN", q.device, q.dtype, 16, num_spans=2)
    from valora.models.layers.vit import resolve_backend

    with pytest.raises(ValueError, match="unknown vision attention backend"):
        resolve_backend("FLASH", q)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="needs a CUDA device"):
            resolve_backend("FLASH_ATTN", q)
