"""Every backend against the `torch` reference, on CPU (Triton interpreter, fp32/fp16) and GPU (fp16/bf16)."""

from __future__ import annotations

import pytest
import torch
from cases import Case, assert_matches, make_case

from valora.lora.ops import BACKENDS, LoRAMeta, default_backend, lora_matmul
from valora.lora.ops.configs import Shape, TileConfig
from valora.lora.tuning.table import ConfigTable, use_table

# Padded rows and columns are loaded (as 16-byte vectors) and then dropped with `where`; the interpreter warns
# when the NaN garbage placed there by the tests meets arithmetic on its way out.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
TRITON = ["atmm", "sgmv", "bgmv"]
ALL = ["torch", "gather", *TRITON]
MIXED = [1, 7, 12, 48, 128, 3]  # one batch, one stack of max rank 128


def tokens_for(backend: str, wanted: int) -> int:
    """bgmv launches 64 split-K programs per token: keep the interpreter to a few tokens."""
    return min(wanted, 6) if backend == "bgmv" and not CUDA else wanted


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_mixed_ranks_one_batch(backend: str, dtype: torch.dtype) -> None:
    case = make_case(tokens_for(backend, 40), 72, (45,), [MIXED], 128, dtype, DEVICE, seed=1)
    assert_matches(case, case.run(backend))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ALL)
def test_fused_slices_with_rank_zero(backend: str, dtype: torch.dtype) -> None:
    ranks = [[16, 0, 5, 9], [3, 16, 0, 1], [0, 7, 16, 12]]
    case = make_case(tokens_for(backend, 30), 40, (36, 9, 17), ranks, 16, dtype, DEVICE, seed=2)
    assert_matches(case, case.run(backend))


@pytest.mark.parametrize("backend", ALL)
def test_single_token(backend: str) -> None:
    case = make_case(1, 50, (33,), [[7, 12]], 16, DTYPES[0], DEVICE, seed=3, no_adapter=0.0)
    assert_matches(case, case.run(backend))


@pytest.mark.parametrize("backend", ["torch", "gather", "atmm", "sgmv"])
def test_many_tokens(backend: str) -> None:
    """4096 tokens over 9 adapters (the interpreter gets narrow layers; the GPU a real one)."""
    hidden, width = (3584, (512,)) if CUDA else (24, (20,))
    case = make_case(4096, hidden, width, [[1, 7, 12, 16, 5, 16, 2, 9, 16]], 16, DTYPES[0], DEVICE, seed=4)
    assert_matches(case, case.run(backend))


@pytest.mark.parametrize("backend", ALL)
def test_no_adapter_tokens_leave_out_untouched(backend: str) -> None:
    case = make_case(5, 32, (16,), [[4, 8]], 8, DTYPES[0], DEVICE, seed=5)
    case.ids[:] = -1
    assert torch.equal(case.run(backend), case.base)


def test_returns_delta_without_out() -> None:
    case = make_case(9, 32, (24,), [[3, 8]], 8, DTYPES[0], DEVICE, seed=6)
    delta = lora_matmul(case.x, case.ids, case.stack_a, case.stack_b, case.ranks[0], case.scalings, "atmm")
    case.base = torch.zeros_like(case.base)
    assert_matches(case, delta)


CONFIGS = [
    TileConfig(16, 16, 16, 4, 2, 1),
    TileConfig(16, 32, 32, 4, 2, 3),  # split-K over 3 programs: fp32 atomics into the intermediate
    TileConfig(64, 16, 64, 4, 2, 2),  # row tile taller than any segment
    TileConfig(32, 64, 16, 4, 2, 1),  # rank tile wider than the stacked rows
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}s{c.split_k}")
def test_atmm_tile_configs(cfg: TileConfig) -> None:
    """Whatever the table says, the result is the same: force each config for both kernels."""
    ranks = [[16, 3, 9], [5, 0, 16]]
    case = make_case(27, 96, (24, 40), ranks, 16, DTYPES[0], DEVICE, seed=7)
    table = ConfigTable("test", {"shrink": [(Shape(1, 1, 1, 1), cfg)], "expand": [(Shape(1, 1, 1, 1), cfg)]})
    with use_table(table):
        assert_matches(case, case.run("atmm"))


def test_reference_matches_dense_formula() -> None:
    """The reference itself, against delta[t] = s * x[t] A[:r]ᵀ B[:, :r]ᵀ written out per token in float64."""
    case = make_case(12, 20, (8, 6), [[3, 5], [0, 2]], 5, torch.float32, "cpu", seed=8)
    expected = case.base.double().clone()
    for t, n in enumerate(case.ids.tolist()):
        col = 0
        for j, width in enumerate(case.slices):
            r = int(case.ranks[j, n]) if n >= 0 else 0
            if r:
                a = case.stack_a[n, j * 5 : j * 5 + r].double()
                b = case.stack_b[n, col : col + width, :r].double()
                expected[t, col : col + width] += case.scalings[n].item() * (case.x[t].double() @ a.t() @ b.t())
            col += width
    torch.testing.assert_close(case.reference().double(), expected, rtol=1e-5, atol=1e-5)


def test_checker_catches_a_wrong_result() -> None:
    case = make_case(8, 16, (8,), [[4, 4]], 4, torch.float32, "cpu", seed=9, no_adapter=0.0)
    out = case.run("torch")
    out[3, 2] += 0.05
    with pytest.raises(AssertionError):
        assert_matches(case, out)


def test_default_backend() -> None:
    assert default_backend(torch.device("cpu")) == "torch"
    assert default_backend("cuda") == "atmm"
    assert set(BACKENDS) == {"torch", "gather", "atmm", "sgmv", "bgmv"}


def _engine_case() -> Case:
    """A fused qkv call of Qwen2-VL-7B's size: mixed ranks up to 128, some slices untargeted."""
    ranks = [[16, 128, 8, 1, 64, 48], [16, 0, 8, 7, 64, 12], [16, 128, 0, 7, 32, 12]]
    return make_case(333, 3584, (3584, 512, 512), ranks, 128, torch.bfloat16, "cuda", seed=10)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["gather", *TRITON])
def test_gpu_qwen_qkv(backend: str, dtype: torch.dtype, tokens: int) -> None:
    ranks = [[16, 128, 8, 1, 64, 48], [16, 0, 8, 7, 64, 12], [16, 128, 0, 7, 32, 12]]
    case = make_case(tokens, 3584, (3584, 512, 512), ranks, 128, dtype, "cuda", seed=11)
    assert_matches(case, case.run(backend))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_atmm_needs_no_sync_and_replays_in_a_graph() -> None:
    case = _engine_case()
    meta = LoRAMeta.build(case.ids, "cuda")
    out = case.base.clone()

    def step() -> None:
        lora_matmul(case.x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, "atmm",
                    slices=case.slices, out=out, meta=meta)

    step()  # compile, and let the meta allocate its scratch
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out.copy_(case.base)
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches(case, out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    out.copy_(case.base)
    graph.replay()
    assert_matches(case, out)


@pytest.mark.parametrize("backend", [*TRITON, "gather"])
def test_graph_meta_refilled_for_any_mix_matches_reference(backend: str) -> None:
    """One fixed-size meta (as a CUDA graph captures it), refilled with different mixes of adapters and fewer
    real tokens than its size: every fill gives the reference result, padding tokens are left alone."""
    from valora.lora.ops.meta import GraphLoRAMeta

    size = tokens_for(backend, 24)
    graph = GraphLoRAMeta(size, max_slots=4, device=DEVICE)
    for seed, used in ((10, size), (11, size - 3), (12, 1)):
        case = make_case(used, 40, (36, 9, 17), [[16, 0, 5, 9], [3, 16, 0, 1], [0, 7, 16, 12]], 16, DTYPES[0],
                         DEVICE, seed=seed)
        graph.fill(case.ids.tolist())
        pad = size - used
        x = torch.cat([case.x, torch.randn(pad, 40, dtype=case.x.dtype, device=DEVICE)])
        out = torch.cat([case.base, torch.randn(pad, case.base.shape[1], dtype=case.base.dtype, device=DEVICE)])
        before = out.clone()
        lora_matmul(x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, backend, slices=case.slices,
                    out=out, meta=graph.meta)
        assert_matches(case, out[:used])
        assert torch.equal(out[used:], before[used:])


def test_graph_meta_refuses_more_adapters_than_sized_for() -> None:
    from valora.lora.ops.meta import GraphLoRAMeta

    with pytest.raises(ValueError, match="3 adapters"):
        GraphLoRAMeta(8, max_slots=2, device="cpu").fill([0, 1, 2])


def test_gather_in_chunks_matches_reference(monkeypatch) -> None:
    """The gather backend bounds its memory by gathering a few tokens at a time; the result does not change."""
    from valora.lora.ops import gather

    monkeypatch.setattr(gather, "GATHER_BYTES", 1)  # one token per chunk
    case = make_case(23, 40, (36, 9, 17), [[16, 0, 5, 9], [3, 16, 0, 1], [0, 7, 16, 12]], 16, DTYPES[0], DEVICE,
                     seed=13)
    assert_matches(case, case.run("gather"))
