"""The plans `valora tune-kernels` searches, and the call shapes it searches them for.

Candidates are pruned per shape only by rules that cannot remove a winner: a row tile at most twice as tall as
the average segment, a rank tile no wider than the (power-of-two rounded) output, split-K chunks of at least two
K blocks, split-K or split-N only while the launch stays under eight waves of programs, and the shared memory of
one Hopper SM. The fused kernel is tried up to `FUSED_MAX_TOKENS` tokens: past that, re-reading x in every column
chunk loses to the intermediate's round trip. The row kernels (a program per token) up to `ROW_MAX_TOKENS`: they
read an adapter's weights once per token, which only decode-sized calls can afford.
"""

from __future__ import annotations

import itertools

from valora.lora.ops.configs import CallShape, Plan, Shape, TileConfig, dot_block_r, row_tiles

BLOCK_M = (16, 32, 64, 128)
SHRINK_BLOCK_N = (16, 32, 64, 128)
SHRINK_BLOCK_K = (64, 128, 256)
SPLIT_K = (1, 2, 4, 8, 16, 32)
EXPAND_BLOCK_N = (64, 128, 256)
EXPAND_BLOCK_K = (16, 32, 64)
FUSED_BLOCK_N = (32, 64, 128, 256)
FUSED_BLOCK_K = (64, 128, 256)
FUSED_MAX_TOKENS = 512
ROW_BLOCK_K = (128, 256, 512, 1024)
ROW_BLOCK_N = (64, 128, 256, 512)
ROW_MAX_TOKENS = 256
NUM_WARPS = (4, 8)
NUM_STAGES = (2, 3, 4)
DEFAULT_STAGES = 3
SMEM_BYTES = 227 * 1024
MAX_SPLIT_PROGRAMS = 8 * 132  # eight waves on an H100/H200

# The tuning grid: the LoRA calls of a Qwen2-VL-7B decoder layer as the engine makes them (input features, output
# slices: fused q/k/v and gate/up are one call each), decode and prefill token counts, adapters in the batch, and
# the stack's max rank (--max-lora-rank: 16 as in the engine benchmark, 64 the default).
LAYERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "qkv": (3584, (3584, 512, 512)),
    "o": (3584, (3584,)),
    "gate_up": (3584, (18944, 18944)),
    "down": (18944, (3584,)),
}
TOKENS = (1, 8, 16, 32, 64, 128, 512, 2048, 8192)
SEGMENTS = (1, 4, 16, 32, 64)
RANKS = (16, 64)


def _pow2_at_least(v: int) -> int:
    return 1 << (max(v, 1) - 1).bit_length()


def _warps(block_m: int, block_n: int) -> int:
    """Stage-one warps: 8 once the fp32 accumulator would need more than 64 registers a thread with 4."""
    return 4 if block_m * block_n <= 8192 else 8


def _fits(cfg: TileConfig, elem_bytes: int = 2) -> bool:
    stage = (cfg.block_m + cfg.block_n) * cfg.block_k * elem_bytes
    return stage * cfg.num_stages <= SMEM_BYTES


def _fused_fits(cfg: TileConfig, block_r: int, elem_bytes: int = 2) -> bool:
    """x and A tiles of the shrink loop, B and y tiles of the column loop, both pipelined."""
    shrink = (cfg.block_m + block_r) * cfg.block_k
    expand = (block_r + cfg.block_m) * cfg.block_n
    return max(shrink, expand) * elem_bytes * cfg.num_stages <= SMEM_BYTES


def _programs(shape: Shape, block_m: int, block_n: int) -> int:
    return (-(-shape.tokens // block_m) + shape.segments) * -(-shape.n // block_n)


def _row_tiles_allowed(tokens: int, segments: int) -> list[int]:
    tallest = max(16, 2 * _pow2_at_least(-(-tokens // segments)))
    return [m for m in BLOCK_M if m <= tallest]


def _doublings(lo: int, keep) -> list[int]:
    """lo, 2*lo, 4*lo, ... while `keep(value)` holds (lo itself always)."""
    out = [lo]
    while keep(out[-1] * 2):
        out.append(out[-1] * 2)
    return out


def row_grid(op: str, shape: Shape) -> list[TileConfig]:
    """The row kernel's configs worth timing for `shape` (none past ROW_MAX_TOKENS): K blocks and split-K for the
    shrink, column tiles and chunks for the expand, under eight waves of programs."""
    if shape.tokens > ROW_MAX_TOKENS:
        return []
    if op == "shrink":
        return [TileConfig(1, 0, k, 4, DEFAULT_STAGES, s) for k in ROW_BLOCK_K if k <= max(shape.k, 128)
                for s in SPLIT_K if s == 1 or (shape.k // s >= 2 * k and shape.tokens * s <= MAX_SPLIT_PROGRAMS)]
    return [TileConfig(1, n, 0, 4, DEFAULT_STAGES, split_n=s) for n in ROW_BLOCK_N
            for s in _doublings(1, lambda s, n=n: s * n <= shape.n and shape.tokens * s <= MAX_SPLIT_PROGRAMS)]


def tile_grid(op: str, shape: Shape) -> list[TileConfig]:
    """Every tile shape (and split-K) of one kernel of the split path worth timing for `shape`, at 3 stages and
    warps fitting the tile; the row kernel's configs with them."""
    block_m = _row_tiles_allowed(shape.tokens, shape.segments)
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
    return [c for c in grid if _fits(c)] + row_grid(op, shape)


def fused_grid(call: CallShape) -> list[TileConfig]:
    """Every fused tile shape and column split worth timing for `call` (none past FUSED_MAX_TOKENS): split-N in
    powers of two from one chunk per slice to one BLOCK_N tile per program, under eight waves."""
    if call.tokens > FUSED_MAX_TOKENS:
        return []
    br = dot_block_r(call.rank)
    grid = []
    for m, n, k in itertools.product(_row_tiles_allowed(call.tokens, call.segments), FUSED_BLOCK_N, FUSED_BLOCK_K):
        tiles = row_tiles(call.tokens, call.segments, m)
        for split in _doublings(1, lambda s, n=n, tiles=tiles: s * n <= call.width and tiles * s <= MAX_SPLIT_PROGRAMS):
            cfg = TileConfig(m, n, k, 4 if m * (n + br) <= 8192 else 8, DEFAULT_STAGES, split_n=split)
            if _fused_fits(cfg, br):
                grid.append(cfg)
    return grid


def schedule_grid(cfg: TileConfig) -> list[TileConfig]:
    """`cfg` under every (warps, stages) pair."""
    return [TileConfig(cfg.block_m, cfg.block_n, cfg.block_k, w, s, cfg.split_k, cfg.split_n)
            for w, s in itertools.product(NUM_WARPS, NUM_STAGES)]


def plan_schedules(plan: Plan, call: CallShape) -> list[Plan]:
    """`plan` with each kernel under every (warps, stages) pair, the other kernel kept (a one-launch plan's
    kernels share theirs)."""
    if plan.fused is not None:
        return [Plan(fused=c) for c in schedule_grid(plan.fused) if _fused_fits(c, dot_block_r(call.rank))]
    if plan.one_launch:
        return [Plan(shrink=plan.shrink, expand=c).as_one_launch() for c in schedule_grid(plan.expand) if _fits(c)]
    return ([Plan(shrink=c, expand=plan.expand) for c in schedule_grid(plan.shrink) if _fits(c)]
            + [Plan(shrink=plan.shrink, expand=c) for c in schedule_grid(plan.expand) if _fits(c)])


def shapes(layers=tuple(LAYERS), tokens=TOKENS, segments=SEGMENTS, ranks=RANKS) -> list[CallShape]:
    """The call shapes of `layers` (names in LAYERS) at every (tokens, adapters <= tokens, rank)."""
    return [CallShape(t, s, LAYERS[layer][0], r, LAYERS[layer][1])
            for layer in layers for t in tokens for s in segments if s <= t for r in ranks]
