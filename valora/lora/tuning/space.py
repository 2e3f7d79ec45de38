"""The configuration space `valora tune-kernels` searches, and the shapes it searches it for.

The full grid is pruned per shape only by rules that cannot remove a winner: a row tile at most twice as tall
as the average segment, a rank tile no wider than the (power-of-two rounded) output, split-K chunks of at
least two K blocks, split-K only while the launch stays under eight waves of programs, and the shared memory
of one Hopper SM.
"""

from __future__ import annotations

import itertools

from valora.lora.ops.configs import Shape, TileConfig

BLOCK_M = (16, 32, 64, 128)
SHRINK_BLOCK_N = (16, 32, 64, 128)
SHRINK_BLOCK_K = (64, 128, 256)
SPLIT_K = (1, 2, 4, 8, 16, 32)
EXPAND_BLOCK_N = (64, 128, 256)
EXPAND_BLOCK_K = (16, 32, 64)
NUM_WARPS = (4, 8)
NUM_STAGES = (2, 3, 4)
DEFAULT_STAGES = 3
SMEM_BYTES = 227 * 1024
MAX_SPLIT_PROGRAMS = 8 * 132  # eight waves on an H100/H200

# The tuning grid: Qwen2-VL-7B's hidden and MLP sizes, its k/v width, and the operator's token and adapter axes.
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
SEGMENTS = (1, 4, 16, 64)
HIDDEN = (3584, 18944)
WIDTHS = (512, 3584, 18944)
RANKS = (16, 64, 128)


def _pow2_at_least(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def _warps(block_m: int, block_n: int) -> int:
    """Stage-one warps: 8 once the fp32 accumulator would need more than 64 registers a thread with 4."""
    return 4 if block_m * block_n <= 8192 else 8


def _fits(cfg: TileConfig, elem_bytes: int = 2) -> bool:
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * elem_bytes
    return stage * cfg.num_stages <= SMEM_BYTES


def _programs(shape: Shape, block_m: int, block_n: int) -> int:
    return (-(-shape.tokens // block_m) + shape.segments) * -(-shape.n // block_n)


def tile_grid(op: str, shape: Shape) -> list[TileConfig]:
    """Every tile shape (and split-K) worth timing for `shape`, at 3 stages and warps fitting the tile."""
    tallest = max(16, 2 * _pow2_at_least(-(-shape.tokens // shape.segments)))
    block_m = [m for m in BLOCK_M if m <= tallest]
    if op == "shrink":
        widest = max(16, _pow2_at_least(shape.n))
        grid = [
            TileConfig(m, n, k, _warps(m, n), DEFAULT_STAGES, s)
            for m, n, k, s in itertools.product(block_m, SHRINK_BLOCK_N, SHRINK_BLOCK_K, SPLIT_K)
            if n <= widest and (s == 1 or (shape.k // s >= 2 * k and _programs(shape, m, n) * s <= MAX_SPLIT_PROGRAMS))
        ]
    else:
        deepest = max(16, _pow2_at_least(shape.k))
        grid = [
            TileConfig(m, n, k, _warps(m, n), DEFAULT_STAGES)
            for m, n, k in itertools.product(block_m, EXPAND_BLOCK_N, EXPAND_BLOCK_K)
            if k <= deepest
        ]
    return [c for c in grid if _fits(c)]


def schedule_grid(cfg: TileConfig) -> list[TileConfig]:
    """`cfg` under every (warps, stages) pair."""
    grid = [TileConfig(cfg.block_m, cfg.block_n, cfg.block_k, w, s, cfg.split_k)
            for w, s in itertools.product(NUM_WARPS, NUM_STAGES)]
    return [c for c in grid if _fits(c)]


def shapes(tokens=TOKENS, segments=SEGMENTS, hidden=HIDDEN, widths=WIDTHS, ranks=RANKS) -> dict[str, list[Shape]]:
    """Shrink shapes are (tokens, segments, hidden, rank rows); expand shapes (tokens, segments, rank, width)."""
    pairs = [(t, s) for t in tokens for s in segments if s <= t]
    return {
        "shrink": [Shape(t, s, k, r) for t, s in pairs for k in hidden for r in ranks],
        "expand": [Shape(t, s, r, w) for t, s in pairs for w in widths for r in ranks],
    }
