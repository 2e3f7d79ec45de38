"""The tuned-table machinery: search space, search, JSON round trip, nearest lookup, heuristic fallback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from valora.cli import build_parser
from valora.lora.ops.configs import OPS, Shape, TileConfig, heuristic
from valora.lora.tuning import space
from valora.lora.tuning.table import ConfigTable, _device_table, table_path
from valora.lora.tuning.tuner import tune_shape

GRID = space.shapes()


def _valid(cfg: TileConfig) -> bool:
    dims = (cfg.block_m, cfg.block_n, cfg.block_k)
    return all(d >= 16 and d & (d - 1) == 0 for d in dims) and cfg.split_k >= 1


@pytest.mark.parametrize("op", OPS)
def test_every_grid_shape_has_valid_candidates(op: str) -> None:
    for shape in GRID[op]:
        tiles = space.tile_grid(op, shape)
        assert tiles and all(_valid(c) for c in tiles)
        assert all(_valid(c) for c in space.schedule_grid(tiles[0]))
        assert _valid(heuristic(op, shape))


def test_tile_grid_prunes_by_shape() -> None:
    decode = space.tile_grid("shrink", Shape(tokens=32, segments=32, k=3584, n=16))
    assert {c.block_m for c in decode} == {16} and {c.block_n for c in decode} == {16}
    assert max(c.split_k for c in decode) > 1
    prefill = space.tile_grid("shrink", Shape(tokens=8192, segments=1, k=3584, n=128))
    assert max(c.block_m for c in prefill) == 128


def test_tune_shape_finds_the_minimum_of_both_grids() -> None:
    shape = Shape(512, 4, 3584, 64)
    best = TileConfig(64, 32, 128, 8, 2, 2)

    def measure(op: str, s: Shape, cfg: TileConfig, reps: int) -> float:
        return sum(abs(a - b) for a, b in zip(vars(cfg).values(), vars(best).values()))

    prepared = []
    assert tune_shape("shrink", shape, measure, lambda op, s, cfgs: prepared.append(len(list(cfgs)))) == best
    assert len(prepared) == 2  # tiles first, then the finalists' warps x stages


def test_table_round_trip_and_nearest_lookup(tmp_path: Path) -> None:
    small, large = TileConfig(16, 16, 128, 4, 3, 8), TileConfig(128, 64, 64, 8, 4, 1)
    table = ConfigTable("GPU X", {
        "shrink": [(Shape(32, 16, 3584, 16), small), (Shape(8192, 16, 3584, 128), large)],
        "expand": [],
    }, {"triton": "3.6.0"})
    path = table_path("NVIDIA Foo 80GB", tmp_path)
    assert path.name == "NVIDIA_Foo_80GB.json"
    table.save(path)
    loaded = ConfigTable.load(path)
    assert loaded.entries == table.entries and loaded.info == table.info
    assert loaded.lookup("shrink", Shape(24, 12, 3584, 16)) == small
    assert loaded.lookup("shrink", Shape(4096, 8, 4096, 64)) == large
    assert loaded.lookup("expand", Shape(24, 12, 16, 3584)) is None  # untuned op: caller uses the heuristic


def test_missing_table_falls_back_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert _device_table("No Such GPU 1234") is None
        assert _device_table("No Such GPU 1234") is None
    assert sum("No Such GPU 1234" in r.getMessage() for r in caplog.records) == 1


def test_cli_registers_tune_kernels() -> None:
    args = build_parser().parse_args(["tune-kernels", "--tokens", "1,32", "--check"])
    assert args.tokens == (1, 32) and args.check
