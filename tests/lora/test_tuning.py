"""The tuned-table machinery: search space, search, JSON round trip, nearest lookup, heuristic fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from valora.cli import build_parser
from valora.lora.ops.configs import OPS, CallShape, Plan, Shape, TileConfig, heuristic, heuristic_plan
from valora.lora.tuning import space
from valora.lora.tuning.table import ConfigTable, _device_table, table_path
from valora.lora.tuning.tuner import Problems, tune, tune_call

GRID = space.shapes()
GATE_UP = space.LAYERS["gate_up"]


def _valid(cfg: TileConfig) -> bool:
    """Power-of-two tiles of at least 16; a row kernel's (block_m 1) has one unused dimension, 0."""
    dims = (cfg.block_n, cfg.block_k) if cfg.block_m == 1 else (cfg.block_m, cfg.block_n, cfg.block_k)
    used = [d for d in dims if d] if cfg.block_m == 1 else dims
    return (len(used) >= 1 and all(d >= 16 and d & (d - 1) == 0 for d in used) and cfg.split_k >= 1
            and cfg.split_n >= 1)


def _plan_valid(plan: Plan) -> bool:
    return all(_valid(c) for c in (plan.fused, plan.shrink, plan.expand) if c is not None)


def test_every_grid_shape_has_valid_candidates() -> None:
    assert len(GRID) == len(set(GRID))
    for shape in GRID:
        for op in OPS:
            tiles = space.tile_grid(op, shape.op_shape(op))
            assert tiles and all(_valid(c) for c in tiles)
            assert all(_valid(c) for c in space.schedule_grid(tiles[0]))
        fused = space.fused_grid(shape)
        assert all(_valid(c) for c in fused)
        assert bool(fused) == (shape.tokens <= space.FUSED_MAX_TOKENS)
        assert _plan_valid(heuristic_plan(shape))


def test_grid_covers_the_engine_decode_calls() -> None:
    """Qwen2-VL-7B's fused qkv and gate/up calls at decode sizes, one to 64 adapters, and single-adapter rank 64."""
    assert CallShape(32, 32, 3584, 16, (3584, 512, 512)) in GRID
    assert CallShape(32, 32, *GATE_UP[:1], 16, GATE_UP[1]) in GRID
    assert CallShape(1, 1, 18944, 64, (3584,)) in GRID
    assert CallShape(2048, 1, 3584, 64, (18944, 18944)) in GRID
    assert {s.segments for s in GRID if s.tokens == 128} == {1, 4, 16, 32, 64}


def test_tile_grid_prunes_by_shape() -> None:
    decode = space.tile_grid("shrink", Shape(tokens=32, segments=32, k=3584, n=16))
    tiles = [c for c in decode if c.block_m > 1]
    assert {c.block_m for c in tiles} == {16} and {c.block_n for c in tiles} == {16}
    assert max(c.split_k for c in tiles) > 1
    rows = [c for c in decode if c.block_m == 1]  # row kernels: decode sizes only
    assert {c.block_k for c in rows} == set(space.ROW_BLOCK_K) and max(c.split_k for c in rows) > 1
    assert all(3584 // c.split_k >= 2 * c.block_k for c in rows if c.split_k > 1)
    prefill = space.tile_grid("shrink", Shape(tokens=8192, segments=1, k=3584, n=128))
    assert max(c.block_m for c in prefill) == 128 and min(c.block_m for c in prefill) > 1


def test_row_expand_grid_splits_columns_within_eight_waves() -> None:
    grid = space.tile_grid("expand", Shape(tokens=32, segments=32, k=16, n=sum(GATE_UP[1])))
    rows = [c for c in grid if c.block_m == 1]
    assert {c.block_n for c in rows} == set(space.ROW_BLOCK_N)
    assert min(c.split_n for c in rows) == 1 and max(c.split_n for c in rows) == 32  # 32 tokens x 32 chunks
    assert not [c for c in space.tile_grid("expand", Shape(512, 1, 16, 3584)) if c.block_m == 1]


def test_fused_grid_splits_columns_within_eight_waves() -> None:
    decode = space.fused_grid(CallShape(32, 32, 3584, 16, GATE_UP[1]))
    assert {c.block_m for c in decode} == {16}
    assert min(c.split_n for c in decode) == 1 and max(c.split_n for c in decode) == 32  # 33 row tiles x 32 chunks
    single = space.fused_grid(CallShape(1, 1, 3584, 64, GATE_UP[1]))
    assert max(c.split_n for c in single) * min(c.block_n for c in single) <= sum(GATE_UP[1])
    assert max(c.split_n for c in single) >= 512


def test_heuristic_plan_fuses_decode_calls_with_narrow_inputs() -> None:
    assert heuristic_plan(CallShape(32, 32, 3584, 16, (3584, 512, 512))).fused is not None
    assert heuristic_plan(CallShape(32, 32, 18944, 16, (3584,))).fused is None  # down_proj: A wider than its output
    assert heuristic_plan(CallShape(2048, 1, 3584, 64, GATE_UP[1])).fused is None


def _measure_by(costs: dict) -> callable:
    """A device whose time for a candidate is `costs` applied to it."""
    return lambda shape, candidate, reps: costs(candidate)


def test_tune_call_chooses_split_k_with_the_expand_measured() -> None:
    """The shrink alone is fastest at split-K 16, but the expand then adds 16 partials: the pair decides."""
    shape = CallShape(32, 32, 3584, 16, (3584,))

    def cost(candidate) -> float:
        if isinstance(candidate, tuple):
            op, cfg = candidate
            return 10.0 / cfg.split_k if op == "shrink" else 5.0
        if candidate.fused is not None:
            return 100.0
        return 10.0 / candidate.shrink.split_k + 5.0 + 2.0 * candidate.shrink.split_k

    final = tune_call(shape, _measure_by(cost))
    best = min(final, key=final.__getitem__)
    assert best.fused is None and best.shrink.split_k == 2  # 5 + 5 + 4 beats 10 + 5 + 2 and 0.6 + 5 + 32


def test_tune_call_prefers_fused_and_keeps_the_previous_choice_when_faster() -> None:
    shape = CallShape(8, 4, 3584, 16, GATE_UP[1])
    outside = Plan(fused=TileConfig(16, 32, 64, 4, 2, split_n=7))  # not on the grid: only the previous table has it
    prepared: list[int] = []

    def device(previous_cost: float):
        def cost(candidate) -> float:
            if isinstance(candidate, tuple):
                return 20.0
            if candidate == outside:
                return previous_cost
            if candidate.fused is not None:
                return 10.0 + abs(candidate.fused.split_n - 16) + candidate.fused.num_stages
            return 40.0

        return _measure_by(cost)

    for previous_cost, expect_previous in ((1.0, True), (100.0, False)):
        final = tune_call(shape, device(previous_cost), lambda s, cands: prepared.append(len(list(cands))),
                          previous=outside)
        best = min(final, key=final.__getitem__)
        assert (best == outside) == expect_previous
        assert heuristic_plan(shape) in final and outside in final
        if not expect_previous:
            assert best.fused.split_n == 16 and best.fused.num_stages == 2  # schedules of the finalists tried
    assert len(prepared) == 6  # three rounds, each compiled before it is timed


def test_tune_call_pairs_row_kernels_with_row_kernels() -> None:
    """Row shrinks are the fastest alone, tile expands too; a plan may not mix them, and the row pair wins whole."""
    shape = CallShape(32, 32, 3584, 16, (3584,))

    def cost(candidate) -> float:
        if isinstance(candidate, tuple):
            return (1.0 if candidate[1].block_m == 1 else 3.0) if candidate[0] == "shrink" else \
                (4.0 if candidate[1].block_m == 1 else 2.0)
        if candidate.fused is not None:
            return 100.0
        return 5.0 if candidate.shrink.block_m == 1 else 6.0

    final = tune_call(shape, _measure_by(cost))
    assert all(p.fused is not None or (p.shrink.block_m == 1) == (p.expand.block_m == 1) for p in final)
    assert min(final, key=final.__getitem__).shrink.block_m == 1


def test_tune_call_times_row_pairs_as_one_launch_too() -> None:
    """Every row pair of round 2 is also timed as one launch; where that is faster it wins, its schedules tried
    with the shrink under the expand's."""
    shape = CallShape(32, 32, 3584, 16, (3584,))

    def cost(candidate) -> float:
        if isinstance(candidate, tuple):
            return 1.0 if candidate[1].block_m == 1 else 3.0
        if candidate.fused is not None or candidate.shrink.block_m != 1:
            return 100.0
        return (4.0 if candidate.one_launch else 5.0) + candidate.expand.num_stages

    timed: list = []
    final = tune_call(shape, _measure_by(lambda c: timed.append(c) or cost(c)))
    best = min(final, key=final.__getitem__)
    assert best.one_launch and best.expand.num_stages == min(p.expand.num_stages for p in final if p.expand)
    rows = [p for p in timed if isinstance(p, Plan) and p.shrink is not None and p.shrink.block_m == 1]
    plain = {p.as_one_launch() for p in rows if not p.one_launch}
    assert plain and plain <= {p for p in rows if p.one_launch}
    assert all((p.shrink.num_warps, p.shrink.num_stages) == (p.expand.num_warps, p.expand.num_stages)
               for p in final if p.one_launch)


def test_tune_goes_smallest_first_and_starts_no_shape_past_the_time_limit() -> None:
    class Device:  # every candidate takes the same time
        measure = staticmethod(_measure_by(lambda candidate: 1.0))

        def compile(self, shape, candidates) -> None:
            pass

    shapes = [CallShape(8, 2, 3584, 16, (3584,)), CallShape(1, 1, 3584, 16, (3584,))]
    assert [r.shape.tokens for r in tune(shapes, Device(), 132)] == [1, 8]
    assert tune(shapes, Device(), 132, time_limit_s=0.0) == []


def test_problems_launch_every_kind_of_candidate() -> None:
    """The tuner's launches run (interpreter on the CPU): a fused plan, split plans of tile and row kernels (the row
    pair also as one launch), each kernel alone."""
    shape = CallShape(5, 2, 32, 16, (24, 8))
    problems = Problems(torch.float32, torch.device("cpu"))
    launch = problems.launcher(shape)
    cfg = TileConfig(16, 16, 16, 4, 2, split_k=2, split_n=3)
    row_shrink, row_expand = TileConfig(1, 0, 16, split_k=2), TileConfig(1, 16, 0, split_n=3)
    for candidate in (Plan(fused=cfg), Plan(shrink=cfg, expand=TileConfig(16, 64, 16)), ("shrink", cfg),
                      ("expand", TileConfig(16, 64, 16)), Plan(shrink=row_shrink, expand=row_expand),
                      Plan(shrink=row_shrink, expand=row_expand).as_one_launch(), ("shrink", row_shrink),
                      ("expand", row_expand)):
        launch(candidate)
    assert problems.launcher(shape) is launch


def test_table_round_trip_and_nearest_lookup(tmp_path: Path) -> None:
    small = Plan(fused=TileConfig(16, 64, 128, 4, 3, split_n=16))
    large = Plan(shrink=TileConfig(128, 64, 64, 8, 4, 1), expand=TileConfig(128, 128, 32, 8, 3))
    table = ConfigTable("GPU X", [(CallShape(32, 16, 3584, 16, (3584, 512, 512)), small),
                                  (CallShape(8192, 16, 3584, 64, (18944, 18944)), large)], info={"triton": "3.6.0"})
    path = table_path("NVIDIA Foo 80GB", tmp_path)
    assert path.name == "NVIDIA_Foo_80GB.json"
    table.save(path)
    loaded = ConfigTable.load(path)
    assert loaded.plans == table.plans and loaded.info == table.info
    assert loaded.lookup(CallShape(24, 12, 3584, 16, (3584, 512, 512))) == small
    assert loaded.lookup(CallShape(4096, 8, 4096, 64, (18944, 18944))) == large
    assert ConfigTable("GPU Y").lookup(CallShape(1, 1, 1, 1, (1,))) is None  # empty: the caller uses the heuristic


def test_reads_tables_of_per_kernel_configs(tmp_path: Path) -> None:
    """A format-1 table (one list per kernel) gives the plan atmm ran from it: each kernel's nearest config."""
    shrink, expand = TileConfig(16, 16, 128, 4, 3, 8), TileConfig(16, 128, 16, 4, 2)
    path = tmp_path / "old.json"
    path.write_text(json.dumps({
        "device": "GPU X", "info": {},
        "shrink": [{"shape": vars(Shape(32, 16, 3584, 16)), "config": shrink.to_dict()}],
        "expand": [{"shape": vars(Shape(32, 16, 16, 3584)), "config": expand.to_dict()}],
    }))
    old = ConfigTable.load(path)
    assert old.lookup(CallShape(32, 32, 3584, 16, (3584,))) == Plan(shrink=shrink, expand=expand)
    old.kernels["expand"] = []
    call = CallShape(32, 32, 3584, 16, (3584,))
    assert old.lookup(call).expand == heuristic("expand", call.op_shape("expand"))


def test_plans_serve_the_token_counts_they_cover_and_updates_keep_the_rest() -> None:
    """Decode shapes tuned into a per-kernel table: their plans serve calls up to twice their largest token count
    and stacks within twice their rank, the per-kernel configs (or, without them, the heuristic) serve prefills;
    re-tuning replaces only its shapes."""
    shrink, expand = TileConfig(64, 16, 128, 4, 3, 2), TileConfig(64, 128, 16, 4, 2)
    fused = Plan(fused=TileConfig(16, 64, 128, 4, 3, split_n=16))
    old = ConfigTable("GPU X", kernels={"shrink": [(Shape(2048, 4, 3584, 16), shrink)],
                                        "expand": [(Shape(2048, 4, 16, 3584), expand)]},
                      info={"timings_us": [{"op": "shrink", "shape": vars(Shape(2048, 4, 3584, 16))}]})
    decode = [CallShape(t, 1, 3584, 16, (3584,)) for t in (1, 128)]
    table = old.updated([(s, fused) for s in decode], [{"shape": s.to_dict(), "tuned": 5.0} for s in decode])
    assert table.lookup(CallShape(64, 4, 3584, 16, (3584,))) == fused
    assert table.lookup(CallShape(256, 4, 3584, 16, (3584,))) == fused
    assert table.lookup(CallShape(4096, 4, 3584, 16, (3584,))) == Plan(shrink=shrink, expand=expand)
    assert ConfigTable("GPU X", table.plans).lookup(CallShape(4096, 4, 3584, 16, (3584,))) is None
    wide = CallShape(4096, 1, 3584, 64, GATE_UP[1])  # another layer's prefill plan: not for this layer's prefills
    assert table.updated([(wide, fused)], []).lookup(CallShape(4096, 4, 3584, 16, (3584,))) == Plan(
        shrink=shrink, expand=expand)
    assert ConfigTable("GPU X", [(wide, fused)]).lookup(CallShape(4096, 4, 4096, 64, (4096,))) == fused  # no own
    assert ConfigTable("GPU X", [(wide, fused)]).lookup(CallShape(4096, 4, 4096, 32, (4096,))) == fused
    assert ConfigTable("GPU X", [(wide, fused)]).lookup(CallShape(4096, 4, 4096, 16, (4096,))) is None  # rank 64
    split = Plan(shrink=shrink, expand=expand)
    again = table.updated([(decode[1], split)], [{"shape": decode[1].to_dict(), "tuned": 4.0}])
    assert again.plans == [(decode[0], fused), (decode[1], split)] and again.kernels == old.kernels
    assert [t.get("tuned") for t in again.info["timings_us"]] == [None, 5.0, 4.0]


def test_missing_table_falls_back_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert _device_table("No Such GPU 1234") is None
        assert _device_table("No Such GPU 1234") is None
    assert sum("No Such GPU 1234" in r.getMessage() for r in caplog.records) == 1


def test_shipped_tables_load() -> None:
    for path in table_path("x").parent.glob("*.json"):
        table = ConfigTable.load(path)
        assert _plan_valid(table.lookup(CallShape(32, 32, 3584, 16, (3584, 512, 512))))


def test_cli_registers_tune_kernels() -> None:
    args = build_parser().parse_args(["tune-kernels", "--tokens", "1,32", "--layers", "qkv,down", "--check",
                                      "--time-limit", "110"])
    assert args.tokens == (1, 32) and args.layers == ("qkv", "down") and args.check and args.time_limit == 110
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune-kernels", "--layers", "mlp"])


def test_a_table_serves_the_element_size_it_was_tuned_for(monkeypatch) -> None:
    """A bf16 table's tiles may not fit shared memory with fp32 activations (seen on the H100: 320 KB asked for):
    fp16 and bf16 calls take its plan, fp32 calls the heuristic."""
    from valora.lora.tuning import table as tables

    call = CallShape(32, 4, 3584, 64, (18944, 18944))
    plan = Plan(fused=TileConfig(64, 256, 256, 8, 4, split_n=8))
    monkeypatch.setattr(tables, "_device_table", lambda name: ConfigTable(name, [(call, plan)],
                                                                         info={"dtype": "bfloat16"}))
    monkeypatch.setattr(tables, "_device_key", lambda device: ("GPU X", 132))
    tables._choose.cache_clear()
    try:
        assert tables.choose(call, torch.device("cpu"), torch.bfloat16) == plan
        assert tables.choose(call, torch.device("cpu"), torch.float16) == plan
        assert tables.choose(call, torch.device("cpu"), torch.float32) == heuristic_plan(call, 132)
    finally:
        tables._choose.cache_clear()
