"""Every backend against the `torch` reference, on CPU (Triton interpreter, fp32/fp16) and GPU (fp16/bf16)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from cases import Case, assert_matches, make_case

from valora.lora.ops import BACKENDS, LoRAMeta, default_backend, lora_matmul
from valora.lora.ops.batch import LoRABatch
from valora.lora.ops.configs import CallShape, Plan, TileConfig
from valora.lora.ops.meta import GraphLoRAMeta

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


SPLIT_PLANS = [
    Plan(shrink=TileConfig(16, 16, 16, 4, 2, 1), expand=TileConfig(16, 16, 16, 4, 2)),
    # split-K over 3 programs (partial sums the expand adds up); expand rank tile wider than the stack
    Plan(shrink=TileConfig(16, 32, 32, 4, 2, 3), expand=TileConfig(32, 64, 32, 4, 2)),
    Plan(shrink=TileConfig(64, 16, 64, 4, 2, 2), expand=TileConfig(64, 32, 16, 4, 2)),  # rows taller than segments
    Plan(shrink=TileConfig(32, 64, 16, 4, 2, 1), expand=TileConfig(16, 128, 16, 4, 2)),  # rank tile > stacked rows
]
FUSED_PLANS = [
    Plan(fused=TileConfig(16, 16, 16, 4, 2)),  # one chunk: a program walks all columns of its slice
    Plan(fused=TileConfig(16, 32, 32, 4, 2, split_n=3)),  # chunks that do not divide the slices
    Plan(fused=TileConfig(32, 16, 64, 4, 2, split_n=1000)),  # more chunks than tiles: one tile each
    Plan(fused=TileConfig(64, 64, 16, 4, 2, split_n=2)),  # row and column tiles wider than anything
]
# Row kernels (block_m 1): a program per token, its slot from `meta.ids`
ROW_PLANS = [
    Plan(shrink=TileConfig(1, 0, 16, 4, 2), expand=TileConfig(1, 16, 0, 4, 2)),  # one split, one chunk per slice
    Plan(shrink=TileConfig(1, 0, 32, 4, 2, 3), expand=TileConfig(1, 32, 0, 4, 2, split_n=3)),  # uneven chunks
    Plan(shrink=TileConfig(1, 0, 64, 4, 2, 2), expand=TileConfig(1, 16, 0, 4, 2, split_n=1000)),  # a tile each
]
# The same as one launch: the expand programs wait for their token's partial sums
ONE_LAUNCH_PLANS = [p.as_one_launch() for p in ROW_PLANS]
PLANS = SPLIT_PLANS + FUSED_PLANS + ROW_PLANS + ONE_LAUNCH_PLANS


def plan_id(plan: Plan) -> str:
    cfgs = [(k, c) for k, c in (("f", plan.fused), ("s", plan.shrink), ("e", plan.expand)) if c is not None]
    return "-".join(f"{k}{c.block_m}.{c.block_n}.{c.block_k}.{c.split_k}.{c.split_n}" for k, c in cfgs) + (
        "-one" if plan.one_launch else "")


def forced(plan: Plan):
    """Every atmm call runs by `plan`, whatever its shape (a table's nearest entry would not: it covers only calls
    of about its token count and rank)."""
    return mock.patch("valora.lora.ops.atmm.choose", lambda call, device, dtype: plan)


@pytest.mark.parametrize("plan", PLANS, ids=plan_id)
def test_atmm_plans(plan: Plan) -> None:
    """Whatever the table says, the result is the same: each plan, split or fused, on fused slices with rank 0
    on some of them, mixed ranks and tokens without an adapter."""
    ranks = [[16, 3, 9], [5, 0, 16]]
    case = make_case(27, 96, (24, 40), ranks, 16, DTYPES[0], DEVICE, seed=7)
    with forced(plan):
        assert_matches(case, case.run("atmm"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", [*FUSED_PLANS[:2], ROW_PLANS[1], ONE_LAUNCH_PLANS[1]], ids=plan_id)
def test_fused_decode_shapes(plan: Plan, dtype: torch.dtype) -> None:
    """The fused and row kernels where the engine uses them: fused qkv (k and v narrower) and gate/up, ranks 8-64
    mixed in a rank-64 stack, some adapters not targeting some slices, one token per adapter and several, rows
    without one."""
    qkv = [[8, 64, 16, 32, 0, 24], [8, 64, 0, 32, 40, 24], [8, 0, 16, 32, 40, 24]]
    gate_up = [[64, 8, 0, 16], [64, 8, 32, 0]]
    with forced(plan):
        for seed, (slices, ranks, tokens) in enumerate((((48, 16, 16), qkv, 6), ((64, 64), gate_up, 21))):
            case = make_case(tokens, 80, slices, ranks, 64, dtype, DEVICE, seed=20 + seed)
            assert_matches(case, case.run("atmm"))


@pytest.mark.parametrize("plan", [SPLIT_PLANS[1], FUSED_PLANS[1], ROW_PLANS[1], ONE_LAUNCH_PLANS[1]], ids=plan_id)
def test_merged_adapter_corrections(plan: Plan) -> None:
    """Mixture mode through the kernels: with slot 1 merged, its tokens get nothing, every other token its own
    delta minus slot 1's (negated scalings), base-model tokens only the subtraction."""
    ranks = [[16, 8, 12], [4, 16, 0]]
    case = make_case(19, 64, (24, 40), ranks, 16, DTYPES[0], DEVICE, seed=30)
    slots = case.ids.tolist()
    lora = LoRABatch.build(slots, 1, DEVICE)
    out = case.base.clone()
    with forced(plan):
        lora_matmul(case.x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, "atmm", slices=case.slices,
                    out=out, meta=lora.own)
        lora_matmul(case.x, None, case.stack_a, case.stack_b, case.ranks, -case.scalings, "atmm",
                    slices=case.slices, out=out, meta=lora.correction)
    expected = case.base.float().clone()
    for ids, scalings in (([s if s != 1 else -1 for s in slots], case.scalings),
                          ([1 if s != 1 else -1 for s in slots], -case.scalings)):
        lora_matmul(case.x.float(), ids, case.stack_a.float(), case.stack_b.float(), case.ranks, scalings, "torch",
                    slices=case.slices, out=expected)
    rtol, atol = (1e-5, 1e-5) if out.dtype == torch.float32 else (2e-3, 5e-3)
    torch.testing.assert_close(out.float(), expected, rtol=rtol, atol=atol * (expected - case.base.float()).abs().max())
    assert torch.equal(out[case.ids == 1], case.base[case.ids == 1])


def test_a_plan_does_not_mix_row_and_tile_kernels() -> None:
    """Their intermediates are indexed differently (by token, by position in the segment order)."""
    with pytest.raises(ValueError, match="both row kernels"):
        Plan(shrink=ROW_PLANS[0].shrink, expand=SPLIT_PLANS[0].expand)
    with pytest.raises(ValueError, match="no row variant"):
        Plan(fused=TileConfig(1, 16, 16))
    with pytest.raises(ValueError, match="one launch"):
        Plan(shrink=SPLIT_PLANS[0].shrink, expand=SPLIT_PLANS[0].expand, one_launch=True)
    with pytest.raises(ValueError, match="same warps and stages"):  # one kernel, one schedule
        Plan(shrink=TileConfig(1, 0, 16, 8, 3), expand=TileConfig(1, 16, 0, 4, 2), one_launch=True)


@pytest.mark.parametrize("plan", [ROW_PLANS[0], ONE_LAUNCH_PLANS[0], FUSED_PLANS[1]], ids=plan_id)
def test_a_plan_survives_the_table_format(plan: Plan) -> None:
    assert Plan.from_dict(plan.to_dict()) == plan
    assert ("one_launch" in plan.to_dict()) == plan.one_launch  # tables without one-launch plans keep their form


def test_one_launch_leaves_its_flags_zero_for_the_next_call() -> None:
    """The expand programs count their token's finished partial sums in the metadata's flags; the last reader of
    each (token, slice) puts its flag back to zero, so the next layer's call, or a graph's next replay, starts
    from zero without a memset."""
    case = make_case(9, 64, (24, 40), [[16, 3, 9], [5, 0, 16]], 16, DTYPES[0], DEVICE, seed=8)
    meta = LoRAMeta.build(case.ids, DEVICE)
    out = case.base.clone()
    with forced(ONE_LAUNCH_PLANS[1]):
        for _ in range(2):  # a second call on the same metadata gives the same result
            out.copy_(case.base)
            lora_matmul(case.x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, "atmm",
                        slices=case.slices, out=out, meta=meta)
            assert_matches(case, out)
            assert meta._flags and not any(f.any() for f in meta._flags.values())


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


GPU_PLANS = [  # engine-sized tiles of both kinds (the interpreter's are tiny)
    Plan(fused=TileConfig(16, 64, 128, 4, 3, split_n=16)),
    Plan(fused=TileConfig(32, 128, 64, 8, 3, split_n=1)),
    Plan(shrink=TileConfig(16, 32, 128, 4, 3, split_k=8), expand=TileConfig(16, 128, 32, 4, 2)),
    Plan(shrink=TileConfig(1, 0, 256, 4, 3, split_k=7), expand=TileConfig(1, 256, 0, 8, 2, split_n=8)),
    Plan(shrink=TileConfig(1, 0, 256, 4, 3, split_k=7), expand=TileConfig(1, 256, 0, 8, 2, split_n=8)).as_one_launch(),
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("tokens", [1, 64, 333])
@pytest.mark.parametrize("plan", GPU_PLANS, ids=plan_id)
def test_gpu_plans_at_engine_shapes(plan: Plan, tokens: int) -> None:
    """Both plan kinds in bf16 on Qwen2-VL-7B's fused qkv (mixed ranks up to 128) and gate/up (rank 64)."""
    ranks = [[16, 128, 8, 1, 64, 48], [16, 0, 8, 7, 64, 12], [16, 128, 0, 7, 32, 12]]
    with forced(plan):
        case = make_case(tokens, 3584, (3584, 512, 512), ranks, 128, torch.bfloat16, "cuda", seed=12)
        assert_matches(case, case.run("atmm"))
        case = make_case(tokens, 3584, (18944, 18944), [[64, 16, 0], [64, 0, 32]], 64, torch.bfloat16, "cuda",
                         seed=13)
        assert_matches(case, case.run("atmm"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("plan", GPU_PLANS, ids=plan_id)
def test_gpu_atmm_needs_no_sync_and_replays_in_a_graph(plan: Plan) -> None:
    case = _engine_case()
    meta = LoRAMeta.build(case.ids, "cuda")
    out = case.base.clone()

    def step() -> None:
        lora_matmul(case.x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, "atmm",
                    slices=case.slices, out=out, meta=meta)

    with forced(plan):
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


def _graph_meta_fills(backend: str, size: int, max_slots: int) -> None:
    """One fixed-size meta (as a CUDA graph captures it), refilled with different mixes of adapters and fewer
    real tokens than its size: every fill gives the reference result, padding tokens are left alone."""
    graph = GraphLoRAMeta(size, max_slots=max_slots, device=DEVICE)
    for seed, used in ((10, size), (11, size - 3), (12, 1)):
        case = make_case(used, 40, (36, 9, 17), [[16, 0, 5, 9], [3, 16, 0, 1], [0, 7, 16, 12]], 16, DTYPES[0],
                         DEVICE, seed=seed)
        case.ids[case.ids >= max_slots] = -1
        graph.fill(case.ids.tolist())
        pad = size - used
        x = torch.cat([case.x, torch.randn(pad, 40, dtype=case.x.dtype, device=DEVICE)])
        out = torch.cat([case.base, torch.randn(pad, case.base.shape[1], dtype=case.base.dtype, device=DEVICE)])
        before = out.clone()
        lora_matmul(x, None, case.stack_a, case.stack_b, case.ranks, case.scalings, backend, slices=case.slices,
                    out=out, meta=graph.meta)
        assert_matches(case, out[:used])
        assert torch.equal(out[used:], before[used:])


@pytest.mark.parametrize("backend", [*TRITON, "gather"])
def test_graph_meta_refilled_for_any_mix_matches_reference(backend: str) -> None:
    _graph_meta_fills(backend, tokens_for(backend, 24), 4)


@pytest.mark.parametrize("max_slots", [2, 4])
@pytest.mark.parametrize("plan", [SPLIT_PLANS[1], FUSED_PLANS[0], FUSED_PLANS[2], ROW_PLANS[2], ONE_LAUNCH_PLANS[2]],
                         ids=plan_id)
def test_graph_meta_plans(plan: Plan, max_slots: int) -> None:
    """atmm's plans on graph metadata sized for fewer adapters than the stack holds (a bucket of the batch's
    adapter count), padding included."""
    with forced(plan):
        _graph_meta_fills("atmm", 24, max_slots)


def test_graph_meta_refuses_more_adapters_than_sized_for() -> None:
    with pytest.raises(ValueError, match="3 adapters"):
        GraphLoRAMeta(8, max_slots=2, device="cpu").fill([0, 1, 2])


def test_gather_in_chunks_matches_reference(monkeypatch) -> None:
    """The gather backend bounds its memory by gathering a few tokens at a time; the result does not change."""
    from valora.lora.ops import gather

    monkeypatch.setattr(gather, "GATHER_BYTES", 1)  # one token per chunk
    case = make_case(23, 40, (36, 9, 17), [[16, 0, 5, 9], [3, 16, 0, 1], [0, 7, 16, 12]], 16, DTYPES[0], DEVICE,
                     seed=13)
    assert_matches(case, case.run("gather"))


def test_a_plan_the_gpu_cannot_launch_falls_back_to_the_heuristic(monkeypatch) -> None:
    """A table plan that asks for more shared memory than the GPU has (Triton raises OutOfResources as the kernel
    loads, before it runs) is replaced by the heuristic's for its shape, at once and for later calls; the result is
    the reference's."""
    from triton.runtime.errors import OutOfResources

    from valora.lora.ops import kernels
    from valora.lora.ops.configs import heuristic_plan
    from valora.lora.tuning import table as tables

    greedy = Plan(fused=TileConfig(64, 64, 16, 4, 2, split_n=2))
    run, launched = kernels.run, []

    def guarded(plan, *args):
        launched.append(plan)
        if plan == greedy:
            raise OutOfResources(327680, 232448, "shared memory")
        return run(plan, *args)

    monkeypatch.setattr(kernels, "run", guarded)
    case = make_case(27, 96, (24, 40), [[16, 3, 9], [5, 0, 16]], 16, DTYPES[0], DEVICE, seed=7)
    call = CallShape(27, 2, 96, 16, (24, 40))
    try:
        with tables.use_table(tables.ConfigTable("test", [(call, greedy)])):
            assert_matches(case, case.run("atmm"))
            assert_matches(case, case.run("atmm"))
        fallback = launched[1]
        assert launched == [greedy, fallback, fallback] and fallback.fused != greedy.fused
        assert any(fallback == heuristic_plan(shape, 132) for shape, *_ in tables._unfit)
    finally:
        tables._unfit.clear()


_BUILD_FOR_HOPPER = """
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from valora.lora.ops import kernels

fn = kernels._row_one_launch_kernel
params = list(inspect.signature(fn.fn).parameters)
pointers = {"x_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "mid_ptr": "*fp32",
            "scal_ptr": "*fp32", "ids_ptr": "*i32", "ranks_ptr": "*i32", "flags_ptr": "*i32"}
blocks = {"BLOCK_R": 16, "BLOCK_K": 256, "BLOCK_N": 256, "BLOCK_S": 8}
signature = {p: pointers.get(p, "constexpr" if p in blocks else "i32") for p in params}
source = ASTSource(fn=fn, signature=signature, constexprs={(params.index(k),): v for k, v in blocks.items()})
sys.stdout.write(triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"])
"""


def test_one_launch_kernel_builds_for_hopper_with_its_ordering() -> None:
    """The kernel lowers to Hopper code, checked ahead of time without a GPU (in a process of its own: this one runs
    kernels in the interpreter, which runs programs one at a time and so never shows their ordering). In the code
    the partial sums are stored, a block barrier follows, then the release that signals; the wait is an acquire
    with a barrier after it."""
    import os
    import re
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _BUILD_FOR_HOPPER], env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode != 0 and "ptxas" in run.stderr.lower() and "not found" in run.stderr.lower():
        pytest.skip("this Triton has no NVIDIA tools to build with")
    assert run.returncode == 0, run.stderr[-2000:]
    code = [line.strip() for line in run.stdout.splitlines()
            if line.strip() and not line.strip().startswith((".loc", "//"))]
    signal = next(i for i, line in enumerate(code) if re.search(r"\b(red|atom)\.global\.gpu\.release\.add", line))
    barrier = max(i for i, line in enumerate(code[:signal]) if line.startswith("bar.sync"))
    stores = [i for i, line in enumerate(code[:signal]) if "st.global" in line]
    assert stores and max(stores) < barrier  # the partial sums stored, a barrier, then the signal
    wait = next(i for i, line in enumerate(code) if ".acquire." in line)
    assert any(line.startswith("bar.sync") for line in code[wait:])
