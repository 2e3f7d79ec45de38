"""Paged attention kernels (Triton; the interpreter on CPU) against dense attention over each sequence's own keys."""

from __future__ import annotations

import functools
import math
import random
from types import SimpleNamespace

import pytest
import torch

from valora.engine.block_manager import BlockManager
from valora.engine.model_runner import ModelRunner
from valora.engine.sequence import Sequence
from valora.models.layers import attention_kernels
from valora.models.layers.attention import PagedAttention
from valora.multimodal.inputs import ProcessedPrompt
from valora.sampling_params import SamplingParams

D = 16
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the Triton interpreter (conftest)


def _on_device(kernel, out_index: int):
    """The kernel called on DEVICE copies of its tensor arguments, `out` (the argument at `out_index`) copied back
    in place: the tests build and check everything on the CPU."""

    def call(*args, **kwargs):
        move = lambda x: x.to(DEVICE) if isinstance(x, torch.Tensor) else x  # noqa: E731
        dev_args = [move(a) for a in args]
        kernel(*dev_args, **{k: move(v) for k, v in kwargs.items()})
        args[out_index].copy_(dev_args[out_index].cpu())

    return call


paged_decode_attention = _on_device(attention_kernels.paged_decode_attention, 7)
paged_prefill_attention = _on_device(attention_kernels.paged_prefill_attention, 9)


def _tables(lens: list[int], block_size: int, num_blocks: int, gen: random.Random) -> tuple[torch.Tensor, int]:
    """Random, disjoint, non-contiguous block tables (padded with 0) for contexts of `lens` keys."""
    need = [-(-n // block_size) for n in lens]
    width = max(max(need), 1)
    free = list(range(1, num_blocks))
    gen.shuffle(free)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, n in enumerate(need):
        table[i, :n] = torch.tensor([free.pop() for _ in range(n)], dtype=torch.int32)
    return table, width


def _cache(num_blocks: int, block_size: int, kvh: int, dtype: torch.dtype, seed: int, d: int = D
           ) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks * block_size, kvh, d)
    return torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _reference(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, table: torch.Tensor, ctx: int, q_len: int,
               block_size: int, scale: float) -> torch.Tensor:
    """[q_len, H, D] fp64 causal attention of the last q_len positions of a context of ctx keys."""
    h, kvh = q.shape[1], kc.shape[1]
    if ctx == 0:
        return torch.zeros(q_len, h, q.shape[2], dtype=torch.float64)
    i = torch.arange(ctx)
    slots = table[i // block_size].long() * block_size + i % block_size
    k = kc[slots].double().repeat_interleave(h // kvh, dim=1)  # [ctx, H, D]
    v = vc[slots].double().repeat_interleave(h // kvh, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    pos = torch.arange(ctx - q_len, ctx)
    s = s.masked_fill(i[None, None, :] > pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_splits", [None, 4])
def test_decode(dtype, heads, block_size, num_splits):
    h, kvh = heads
    gen = random.Random(block_size * 100 + h * 10 + kvh)
    lens = [37, 0, 1, 70, block_size * 3, 5]  # 0: a padding row
    num_blocks = 64
    table, _ = _tables(lens, block_size, num_blocks, gen)
    kc, vc = _cache(num_blocks, block_size, kvh, dtype, seed=len(lens) + block_size)
    b = len(lens)
    q = torch.randn(b, h, D, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = torch.full_like(q, float("nan"))
    scale = 0.37
    ctx = torch.tensor(lens, dtype=torch.int32)
    paged_decode_attention(q, kc, vc, table, ctx, block_size, scale, out, num_splits=num_splits)
    assert not out.isnan().any()
    for i, n in enumerate(lens):
        ref = _reference(q[i : i + 1], kc, vc, table[i], n, 1, block_size, scale)[0]
        torch.testing.assert_close(out[i].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 8])
def test_decode_rows_and_long_context(num_splits):
    """Decodes at scattered rows of a larger batch (rows left alone elsewhere), contexts over many tiles."""
    h, kvh, bs = 8, 2, 16
    gen = random.Random(7)
    lens = [300, 129, 0, 64]
    num_blocks = 80
    table, _ = _tables(lens, bs, num_blocks, gen)
    kc, vc = _cache(num_blocks, bs, kvh, torch.float32, seed=3)
    q = torch.randn(9, h, D, generator=torch.Generator().manual_seed(2))
    out = torch.full_like(q, 123.0)
    rows = torch.tensor([7, 0, 3, 5])
    paged_decode_attention(q, kc, vc, table, torch.tensor(lens, dtype=torch.int32), bs, D**-0.5, out, rows=rows,
                           num_splits=num_splits)
    for i, n in enumerate(lens):
        r = int(rows[i])
        ref = _reference(q[r : r + 1], kc, vc, table[i], n, 1, bs, D**-0.5)[0]
        torch.testing.assert_close(out[r].double(), ref, atol=2e-5, rtol=2e-5)
    untouched = [r for r in range(9) if r not in rows.tolist()]
    assert (out[untouched] == 123.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("tiles", [None, (16, 16)])
def test_prefill(dtype, heads, block_size, tiles):
    """Several sequences in one call: fresh prompts, cached prefixes (q_len < context_len), one-token chunks."""
    h, kvh = heads
    gen = random.Random(block_size + h + (tiles is None))
    # (q_len, context_len); prefixes 14, 30, 62, 31 put the diagonal one or two keys before a tile boundary
    spans = [(7, 7), (5, 21), (1, 9), (40, 40), (19, 53), (20, 34), (33, 63), (10, 72), (3, 34)]
    num_blocks = 128
    table, _ = _tables([c for _, c in spans], block_size, num_blocks, gen)
    kc, vc = _cache(num_blocks, block_size, kvh, dtype, seed=block_size)
    starts, t = [], 1  # row 0 and the rows between sequences belong to nobody
    for ql, _ in spans:
        starts.append(t)
        t += ql + 2
    q = torch.randn(t, h, D, generator=torch.Generator().manual_seed(5)).to(dtype)
    out = torch.full_like(q, 123.0)
    scale = 1 / math.sqrt(D)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)
    bm, bn = tiles or (None, None)
    paged_prefill_attention(q, kc, vc, table, i32(starts), i32([s[0] for s in spans]), i32([s[1] for s in spans]),
                            block_size, scale, out, max(s[0] for s in spans), block_m=bm, block_n=bn)
    covered = torch.zeros(t, dtype=torch.bool)
    for j, ((ql, ctx), st) in enumerate(zip(spans, starts)):
        ref = _reference(q[st : st + ql], kc, vc, table[j], ctx, ql, block_size, scale)
        torch.testing.assert_close(out[st : st + ql].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])
        covered[st : st + ql] = True
    assert (out[~covered] == 123.0).all()


def _seq(seq_id: int, prompt_len: int, computed: int, outputs: int = 0) -> Sequence:
    s = Sequence(seq_id, f"r{seq_id}", 0, ProcessedPrompt(list(range(prompt_len))), SamplingParams(), None, 0.0)
    s.output_ids = [1] * outputs
    s.num_computed = computed
    return s


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's check of the module; on the GPU the engine "
                    "tests (test_parity, test_cuda_graphs) run the same path")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_module_triton_matches_torch(dtype):
    """A mixed step built by ModelRunner.prepare: PagedAttention with the Triton kernels == its PyTorch path."""
    h, kvh, bs = 4, 2, 4
    model = SimpleNamespace(decoder_config=SimpleNamespace(num_kv_heads=kvh, head_dim=D, num_layers=1))
    blocks = BlockManager(num_blocks=64, block_size=bs)
    blocks.free_blocks = type(blocks.free_blocks)(random.Random(0).sample(range(64), 64))  # scattered blocks
    runner = ModelRunner(model, blocks, dtype, torch.device("cpu"), max_blocks_per_seq=16)
    seqs = [
        _seq(0, 11, 0),  # fresh prompt
        _seq(1, 9, 12, outputs=4),  # decode at context 13
        _seq(2, 30, 17),  # recompute / chunk with a cached prefix of 17
        _seq(3, 6, 6, outputs=1),  # decode at context 7
        _seq(4, 3, 0),
    ]
    for s in seqs:
        blocks.allocate(s, len(s))
    batch, _, _ = runner.prepare(seqs, [len(s) - s.num_computed for s in seqs], {})
    meta = batch.attn
    assert meta.decode_block_tables.shape == (2, 16) and meta.decode_max_context == 13
    assert [p[1:] for p in meta.prefill_host] == [(11, 11), (13, 30), (3, 3)]

    g = torch.Generator().manual_seed(11)
    t = batch.input_ids.shape[0]
    q = torch.randn(t, h, D, generator=g).to(dtype)
    k = torch.randn(t, kvh, D, generator=g).to(dtype)
    v = torch.randn(t, kvh, D, generator=g).to(dtype)
    outs = {}
    for backend in ("torch", "triton"):
        cache = tuple(torch.randn(c.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
                      for c in runner.kv_caches[0])  # same prefix contents for both backends
        outs[backend] = PagedAttention(h, kvh, D, backend=backend)(q, k, v, cache, meta)
    torch.testing.assert_close(outs["triton"], outs["torch"], atol=TOL[dtype] * 2, rtol=TOL[dtype] * 2)


def test_attention_ints_start_16_byte_aligned():
    """Whatever a step's token, decode and prefill counts, every attention view the kernels take starts on a 16-byte
    boundary of the step's one upload (Triton builds a kernel variant per pointer alignment) and holds its values."""
    model = SimpleNamespace(decoder_config=SimpleNamespace(num_kv_heads=2, head_dim=D, num_layers=1))
    for steps in ([(5, 0, 0)], [(5, 0, 0), (3, 3, 1)], [(7, 2, 0), (4, 4, 2), (9, 9, 1)],
                  [(2, 2, 3), (3, 0, 0), (6, 6, 1), (1, 0, 0), (11, 5, 0)]):
        blocks = BlockManager(num_blocks=64, block_size=4)
        runner = ModelRunner(model, blocks, torch.float32, torch.device("cpu"))
        seqs = [_seq(i, n, computed, outputs) for i, (n, computed, outputs) in enumerate(steps)]
        for seq in seqs:
            blocks.allocate(seq, len(seq))
        meta = runner.prepare(seqs, [len(s) - s.num_computed for s in seqs], {})[0].attn
        views = [meta.prefill_q_starts, meta.prefill_q_lens, meta.prefill_context_lens, meta.prefill_block_tables,
                 meta.decode_context_lens, meta.decode_block_tables]
        for v in (v for v in views if v is not None):
            assert (v.data_ptr() - v.untyped_storage().data_ptr()) % 16 == 0, steps
        decodes = [s for s in seqs if len(s) - s.num_computed == 1 and s.num_computed > 0]  # the runner's rule
        prefills = [s for s in seqs if s not in decodes]
        if decodes:
            assert meta.decode_context_lens.tolist() == [len(s) for s in decodes]
            assert [row[: len(s.block_table)] for row, s in zip(meta.decode_block_tables.tolist(), decodes)] == \
                [s.block_table for s in decodes]
        if prefills:
            assert meta.prefill_q_lens.tolist() == [len(s) - s.num_computed for s in prefills]
            assert meta.prefill_context_lens.tolist() == [len(s) for s in prefills]
            assert [row[: len(s.block_table)] for row, s in zip(meta.prefill_block_tables.tolist(), prefills)] == \
                [s.block_table for s in prefills]


def test_head_dim_not_a_power_of_two():
    """D = 24 runs as a masked 32-wide tile, in both kernels."""
    d, h, kvh, bs = 24, 6, 2, 4
    gen = random.Random(3)
    spans = [(9, 9), (4, 15)]
    table, _ = _tables([c for _, c in spans], bs, 16, gen)
    kc, vc = _cache(16, bs, kvh, torch.float32, seed=4, d=d)
    q = torch.randn(13, h, d, generator=torch.Generator().manual_seed(6))
    out = torch.full_like(q, 123.0)
    i32 = functools.partial(torch.tensor, dtype=torch.int32)
    paged_prefill_attention(q, kc, vc, table, i32([0, 9]), i32([9, 4]), i32([9, 15]), bs, 0.2, out, 9)
    for j, ((ql, ctx), st) in enumerate(zip(spans, [0, 9])):
        ref = _reference(q[st : st + ql], kc, vc, table[j], ctx, ql, bs, 0.2)
        torch.testing.assert_close(out[st : st + ql].double(), ref, atol=2e-5, rtol=2e-5)
    qd, od = q[:2].clone(), torch.empty_like(q[:2])
    paged_decode_attention(qd, kc, vc, table, i32([9, 15]), bs, 0.2, od, num_splits=2)
    for j, ctx in enumerate([9, 15]):
        ref = _reference(qd[j : j + 1], kc, vc, table[j], ctx, 1, bs, 0.2)[0]
        torch.testing.assert_close(od[j].double(), ref, atol=2e-5, rtol=2e-5)
