"""Tile configurations of the segment kernels, the shapes they are chosen for, and the fallback heuristic.

A LoRA matmul is two GEMM-like steps. Both are described by one `Shape`: `k` is the reduction length and `n` the
output width, so shrink is (K, S*R) and expand is (R, sum of slice widths).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

OPS = ("shrink", "expand")


@dataclass(frozen=True)
class Shape:
    tokens: int  # tokens that carry an adapter
    segments: int  # distinct adapters among them
    k: int  # reduction length: hidden size (shrink) or max rank (expand)
    n: int  # output width: stacked rank rows (shrink) or output features (expand)


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # shrink only: programs sharing one reduction, summed with fp32 atomics

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, int]) -> TileConfig:
        return TileConfig(**d)


def _clamp_pow2(value: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(value, 1) - 1).bit_length()))


def heuristic(op: str, shape: Shape, num_sms: int = 132) -> TileConfig:
    """A reasonable config with no measurements: row tiles as tall as a segment, ranks in one tile, and (for
    shrink) enough split-K programs to give every SM about two programs when there are few tokens."""
    per_segment = -(-shape.tokens // max(shape.segments, 1))
    block_m = _clamp_pow2(per_segment, 16, 64)
    if op == "expand":
        return TileConfig(block_m, 128 if block_m <= 32 else 64, _clamp_pow2(shape.k, 16, 64), 4, 2)
    block_n = _clamp_pow2(shape.n, 16, 64)
    block_k = 128 if block_m * block_n <= 1024 else 64
    programs = (shape.segments + -(-shape.tokens // block_m)) * -(-shape.n // block_n)
    split = 1
    while split < 32 and programs * split * 2 <= 2 * num_sms and shape.k // (split * 2) >= 2 * block_k:
        split *= 2
    return TileConfig(block_m, block_n, block_k, 4, 3, split)
