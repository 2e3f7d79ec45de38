"""The fused Triton kernels of layers/fused_kernels.py against the PyTorch path they replace (CPU: the Triton
interpreter, forced on through `fused_kernels.use_triton`; GPU: the compiled kernels, fp16/bf16 too), and a tiny
Qwen2-VL / Qwen2.5-VL whose logits do not move when every fused kernel is switched on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from valora.models.layers import fused_kernels
from valora.models.layers.mlp import GatedMLP
from valora.models.layers.norm import LayerNorm, RMSNorm
from valora.models.layers.rotary import MRotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 dots are wrong in the interpreter; these kernels have no dots, but keep CPU runs to fp32/fp16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOKENS = (1, 7, 33)
# fp32: same ops up to sum order and the last ulp of rsqrt/exp/cos; narrow types: one rounding of the type
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


@pytest.fixture
def fused(monkeypatch):
    """Force the Triton kernels (on CPU: the interpreter, which conftest turns on)."""
    monkeypatch.setattr(fused_kernels, "use_triton", lambda x: True)


def _norm(hidden: int, dtype, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(hidden, eps).to(DEVICE, dtype)
    norm.weight.data.copy_(1 + 0.5 * torch.randn(hidden))
    return norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 200])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm(dtype, hidden, tokens, with_residual):
    norm = _norm(hidden, dtype)
    x = (3 * torch.randn(tokens, hidden)).to(DEVICE, dtype)
    residual = torch.randn(tokens, hidden).to(DEVICE, dtype) if with_residual else None
    x0, r0 = x.clone(), residual.clone() if with_residual else None
    got = fused_kernels.rms_norm(x, norm.weight, norm.eps, residual)
    assert torch.equal(x, x0) and (residual is None or torch.equal(residual, r0)), "inputs must be kept"
    if with_residual:
        got, got_res = got
        summed = x + residual
        assert torch.equal(got_res, summed)  # the add is rounded exactly as PyTorch's
        ref = norm._norm(summed)
    else:
        ref = norm._norm(x)
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_rms_norm_strided_rows_and_3d(fused):
    """A q slice of a fused qkv output (InternViT's qk-norm) and a [B, S, H] input take the kernel as they are."""
    norm = _norm(96, torch.float32, eps=1e-5)
    qkv = torch.randn(7, 3 * 96, device=DEVICE)
    q = qkv[:, :96]
    torch.testing.assert_close(norm(q), norm._norm(q), **TOL[torch.float32])
    x = torch.randn(2, 5, 96, device=DEVICE)
    got, res = norm(x, torch.ones_like(x))
    assert got.shape == x.shape and torch.equal(res, x + 1)
    torch.testing.assert_close(got, norm._norm(x + 1), **TOL[torch.float32])


def test_rms_norm_fp32_weight_on_fp16_input():
    """A weight wider than x promotes the output, as `weight * h.to(dtype)` does."""
    norm = _norm(64, torch.float32)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.float16)
    got = fused_kernels.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, norm._norm(x), atol=1e-5, rtol=1e-5)


def test_rms_norm_module_dispatch(fused):
    norm = _norm(96, torch.float32)
    x, r = torch.randn(7, 96, device=DEVICE), torch.randn(7, 96, device=DEVICE)
    h, res = norm(x, r)
    torch.testing.assert_close(h, norm._norm(x + r), **TOL[torch.float32])
    assert torch.equal(res, x + r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inter", [64, 96, 1100, 3420])  # 1100: more than one 1024-wide block per row
@pytest.mark.parametrize("tokens", TOKENS)
def test_silu_and_mul(dtype, inter, tokens):
    gate_up = (3 * torch.randn(tokens, 2 * inter)).to(DEVICE, dtype)
    gate, up = gate_up.split(inter, dim=-1)
    got = fused_kernels.silu_and_mul(gate_up)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    assert got.stride(0) * got.element_size() % 16 == 0  # rows on 16 bytes (3420 halves are not: padded)
    torch.testing.assert_close(got, F.silu(gate) * up, **TOL[dtype])


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_gated_mlp(act, monkeypatch):
    """SiLU takes the fused kernel; any other activation keeps ACT2FN, forced or not."""
    mlp = GatedMLP(48, 96, act).to(DEVICE)
    for p in mlp.parameters():
        p.data.normal_(0, 0.2)
    x = torch.randn(7, 48, device=DEVICE)
    monkeypatch.setattr(fused_kernels, "use_triton", lambda t: False)
    ref = mlp(x, None)
    calls = []
    real = fused_kernels.silu_and_mul
    monkeypatch.setattr(fused_kernels, "use_triton", lambda t: True)
    monkeypatch.setattr(fused_kernels, "silu_and_mul", lambda t: calls.append(1) or real(t))
    got = mlp(x, None)
    assert len(calls) == (act == "silu")
    torch.testing.assert_close(got, ref, **TOL[torch.float32])


ROPE_CASES = {  # (q heads, kv heads, head_dim, M-RoPE sections or None)
    "mrope-gqa": (4, 2, 16, (2, 3, 3)),
    "mrope-qwen2vl-sections": (3, 1, 128, (16, 24, 24)),
    "plain-mha": (5, 5, 24, None),  # head_dim/2 = 12: not a power of two
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(ROPE_CASES))
@pytest.mark.parametrize("tokens", TOKENS)
def test_rotary_qk(dtype, case, tokens):
    hq, hk, d, sections = ROPE_CASES[case]
    rotary = MRotaryEmbedding(d, 1e6 if sections else 1e4, sections).to(DEVICE)
    # positions up to 40k (long contexts: large angles), three different axes
    positions = torch.randint(0, 40000, (3, tokens), device=DEVICE)
    # q, k as the decoder has them: views of one fused qkv row
    qkv = torch.randn(tokens, (hq + 2 * hk) * d).to(DEVICE, dtype)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hk) * d].view(tokens, hk, d)
    ref_q, ref_k = rotary.for_step(positions, dtype, fused=False)(q, k)
    got_q, got_k = rotary.for_step(positions, dtype, fused=True)(q, k)
    assert got_q.is_contiguous() and got_k.is_contiguous()
    assert got_q.shape == q.shape and got_k.shape == k.shape and got_q.dtype == dtype
    torch.testing.assert_close(got_q, ref_q, **TOL[dtype])
    torch.testing.assert_close(got_k, ref_k, **TOL[dtype])


def test_rotary_qk_one_dim_and_strided_positions():
    """[T] positions and a [3, T] slice of a wider static buffer (a CUDA-graph input) both work."""
    rotary = MRotaryEmbedding(16, 1e4, (2, 3, 3)).to(DEVICE)
    buf = torch.randint(0, 500, (3, 40), device=DEVICE)
    q, k = torch.randn(7, 2, 16, device=DEVICE), torch.randn(7, 1, 16, device=DEVICE)
    for positions in (buf[:, :7], buf[0, :7]):
        ref = rotary.for_step(positions, torch.float32, fused=False)(q, k)
        got = rotary.for_step(positions, torch.float32, fused=True)(q, k)
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, **TOL[torch.float32])


def test_empty_batch():
    x = torch.randn(0, 64, device=DEVICE)
    w = torch.ones(64, device=DEVICE)
    assert fused_kernels.rms_norm(x, w, 1e-6).shape == (0, 64)
    assert fused_kernels.silu_and_mul(torch.randn(0, 128, device=DEVICE)).shape == (0, 64)


def test_dispatch_default():
    """Only CUDA tensors take the kernels by default."""
    assert not fused_kernels.use_triton(torch.zeros(1))
    if torch.cuda.is_available() and fused_kernels.HAS_TRITON and fused_kernels.ENABLED:
        assert fused_kernels.use_triton(torch.zeros(1, device="cuda"))


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs CUDA")
def test_cuda_graph_replay_reads_new_inputs():
    """Captured once, a graph of the three kernels recomputes from whatever its static inputs hold at replay."""
    dtype = torch.bfloat16
    norm = _norm(96, dtype)
    rotary = MRotaryEmbedding(64, 1e6, (8, 12, 12)).to(DEVICE)
    x, res = torch.randn(5, 96, device=DEVICE, dtype=dtype), torch.randn(5, 96, device=DEVICE, dtype=dtype)
    gate_up = torch.randn(5, 2 * 80, device=DEVICE, dtype=dtype)
    qkv = torch.randn(5, 8 * 64, device=DEVICE, dtype=dtype)
    positions = torch.zeros(3, 16, dtype=torch.long, device=DEVICE)

    def step():
        q, k = qkv[:, : 4 * 64].view(5, 4, 64), qkv[:, 4 * 64 : 6 * 64].view(5, 2, 64)
        rope = rotary.for_step(positions[:, :5], dtype, fused=True)
        return (*norm(x, res), fused_kernels.silu_and_mul(gate_up), *rope(q, k))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for t in (x, res, gate_up, qkv):
        t.copy_(torch.randn_like(t))
    positions.copy_(torch.randint(0, 30000, positions.shape, device=DEVICE))
    graph.replay()
    for got, ref in zip(outs, step()):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 80, 200])
@pytest.mark.parametrize("form", ["plain", "residual", "scaled"])
def test_layer_norm(dtype, hidden, form):
    norm = LayerNorm(hidden, eps=1e-6).to(DEVICE, dtype)
    norm.weight.data.copy_(1 + 0.5 * torch.randn(hidden))
    norm.bias.data.copy_(0.3 * torch.randn(hidden))
    x = (3 * torch.randn(9, hidden) + 1).to(DEVICE, dtype)
    residual = torch.randn(9, hidden).to(DEVICE, dtype) if form != "plain" else None
    scale = (0.1 * torch.randn(hidden)).to(DEVICE, dtype) if form == "scaled" else None
    got = fused_kernels.layer_norm(x, norm.weight, norm.bias, norm.eps, residual, scale)
    if residual is None:
        ref = F.layer_norm(x, (hidden,), norm.weight, norm.bias, norm.eps)
    else:
        summed = residual + (x if scale is None else scale * x)
        got, got_res = got
        assert torch.equal(got_res, summed)  # the scale and the add rounded as PyTorch's
        ref = F.layer_norm(summed, (hidden,), norm.weight, norm.bias, norm.eps)
    assert got.dtype == dtype
    torch.testing.assert_close(got, ref, **TOL[dtype])


def test_norm_modules_take_a_layer_scale(fused, monkeypatch):
    """LayerNorm and RMSNorm give (norm(r + s * x), r + s * x) on both paths."""
    x, r, s = (torch.randn(5, 48, device=DEVICE) for _ in range(3))
    for norm in (LayerNorm(48).to(DEVICE), _norm(48, torch.float32)):
        fused_out = norm(x, r, s[0])
        monkeypatch.setattr(fused_kernels, "use_triton", lambda t: False)
        plain_out = norm(x, r, s[0])
        monkeypatch.setattr(fused_kernels, "use_triton", lambda t: True)
        for got, ref in zip(fused_out, plain_out):
            torch.testing.assert_close(got, ref, **TOL[torch.float32])
    with pytest.raises(ValueError, match="only applies with a residual"):
        fused_kernels.rms_norm(x, s[0], 1e-6, None, s[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [64, 1100])
def test_quick_gelu(dtype, width):
    from transformers.activations import ACT2FN

    x = (3 * torch.randn(5, width)).to(DEVICE, dtype)
    got = fused_kernels.quick_gelu(x[:, 1:])  # a strided view
    torch.testing.assert_close(got, ACT2FN["quick_gelu"](x[:, 1:]), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_qk_fp32_math(dtype):
    """The vision towers' 2D RoPE: head size 80 (rotary half 40), row and column sections, q and k as views of the
    fused qkv output, rotated in fp32 and rounded once, as the PyTorch path does."""
    from valora.models.layers.rotary import make_rope

    heads, d, tokens = 3, 80, 20
    inv = 1.0 / (10000 ** (torch.arange(0, d // 2, 2, dtype=torch.float32) / (d // 2)))
    inv_freq, axis = torch.cat([inv, inv]).to(DEVICE), torch.arange(2).repeat_interleave(d // 4).to(DEVICE)
    positions = torch.randint(0, 64, (2, tokens), dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(tokens, 3, heads, d).to(DEVICE, dtype)
    q, k = qkv[:, 0], qkv[:, 1]
    ref = make_rope(positions, inv_freq, axis, fused=False, fp32=True)(q, k)
    got = make_rope(positions, inv_freq, axis, fused=True, fp32=True)(q, k)
    for g, r in zip(got, ref):
        assert g.dtype == dtype and g.is_contiguous()
        torch.testing.assert_close(g, r, **TOL[dtype])


# the kernels each family's vision side adds to the LM's (rms_norm, silu_and_mul, rotary_qk)
VISION_KERNELS = {"qwen2_vl": ("layer_norm", "quick_gelu"), "qwen2_5_vl": (), "llava": ("layer_norm", "quick_gelu"),
                  "internvl": ("layer_norm",)}


@pytest.mark.parametrize("family_name", list(VISION_KERNELS))
def test_tiny_model_logits_unchanged(family_name, model_factory, monkeypatch):
    """Whole engine, fp32: prefill with images and decode steps give the same logits with every fused kernel
    forced on (the vision towers' too, and their attention through the Triton varlen kernel) as on the PyTorch
    path."""
    from valora import LLM, SamplingParams
    from valora.models.layers import attention_kernels
    from valora.testing.families import FAMILIES
    from valora.testing.images import random_image

    spec = FAMILIES[family_name]
    model_dir = model_factory(family_name, initializer_range=0.05)
    # the tower runs both times: no embedding cache, no prefix cache
    llm = LLM(str(model_dir), dtype="float32", device=DEVICE, embed_cache_mb=0, enable_prefix_caching=False)
    prompts = [
        {"prompt": f"{spec.image_prompt} what digit is shown ?", "multi_modal_data": {"image": [random_image(56, 84)]}},
        {"prompt": "describe the scene :", "multi_modal_data": {"image": []}},
    ]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    calls = {name: 0 for name in ("rms_norm", "silu_and_mul", "rotary_qk", *VISION_KERNELS[family_name])}

    def counting(name, real):
        def counted(*args, **kw):
            calls[name] += 1
            return real(*args, **kw)
        return counted

    for name in calls:
        monkeypatch.setattr(fused_kernels, name, counting(name, getattr(fused_kernels, name)))
    calls["varlen_attention"] = 0
    monkeypatch.setattr(attention_kernels, "varlen_attention",
                        counting("varlen_attention", attention_kernels.varlen_attention))

    def run(force: bool) -> tuple[list[torch.Tensor], list[list[int]]]:
        logits: list[torch.Tensor] = []
        model = llm.engine.core.model
        real = type(model).compute_logits
        monkeypatch.setattr(fused_kernels, "use_triton", lambda t: force)
        monkeypatch.setattr(model, "compute_logits", lambda h: logits.append(real(model, h)) or logits[-1])
        outs = llm.generate(prompts, params, use_tqdm=False)
        return logits, [o.outputs[0].token_ids for o in outs]

    ref_logits, ref_tokens = run(False)
    assert not any(calls.values())
    got_logits, got_tokens = run(True)
    assert all(calls.values()), calls
    assert got_tokens == ref_tokens
    assert len(got_logits) == len(ref_logits) >= 4
    for g, r in zip(got_logits, ref_logits):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
