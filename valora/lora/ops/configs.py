"""How `atmm` runs one LoRA call: the call's shape, the kernels' tile configurations, and the fallback heuristic.

A call (`CallShape`) is one `lora_matmul` with its fused output slices. `atmm` runs it by a `Plan`: either the
shrink (x·Aᵀ into an fp32 intermediate) then the expand (·Bᵀ added into y), two kernels each described by a
per-kernel `Shape` (`k` the reduction length, `n` the output width: shrink (K, S*R), expand (R, sum of widths));
or one fused kernel that computes its tokens' x·A in registers and adds its share of the output columns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

OPS = ("shrink", "expand")


@dataclass(frozen=True)
class Shape:
    tokens: int  # tokens that carry an adapter
    segments: int  # distinct adapters among them
    k: int  # reduction length: hidden size (shrink) or max rank (expand)
    n: int  # output width: stacked rank rows (shrink) or output features (expand)


@dataclass(frozen=True)
class CallShape:
    """One `lora_matmul` as a layer makes it: `k` the input features, `rank` the stack's max rank, `slices` the
    output widths of a fused projection (one entry for a plain linear)."""

    tokens: int
    segments: int
    k: int
    rank: int
    slices: tuple[int, ...]

    @property
    def width(self) -> int:
        return sum(self.slices)

    def op_shape(self, op: str) -> Shape:
        if op == "shrink":
            return Shape(self.tokens, self.segments, self.k, len(self.slices) * self.rank)
        return Shape(self.tokens, self.segments, self.rank, self.width)

    def to_dict(self) -> dict:
        return dict(asdict(self), slices=list(self.slices))

    @staticmethod
    def from_dict(d: dict) -> CallShape:
        return CallShape(**dict(d, slices=tuple(d["slices"])))


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # 1: a row kernel (one token per program, its slot from `meta.ids`; see ops/kernels.py)
    block_n: int  # row shrink: unused (the whole rank is one block)
    block_k: int  # row expand: unused
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # shrink: programs sharing one reduction, each writing its partial sum
    split_n: int = 1  # fused and row expand: column chunks the output is cut into, a program per (rows, chunk)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, int]) -> TileConfig:
        return TileConfig(**d)


@dataclass(frozen=True)
class Plan:
    """One fused kernel (`fused`), or the shrink then the expand; row kernels (block_m 1) may run as one launch
    (`one_launch`, under the expand's warps and stages, which the shrink's then equal)."""

    fused: TileConfig | None = None
    shrink: TileConfig | None = None
    expand: TileConfig | None = None
    one_launch: bool = False

    def __post_init__(self) -> None:
        if (self.fused is None) == (self.shrink is None or self.expand is None):
            raise ValueError("a plan is either fused or a shrink and an expand")
        if self.fused is not None and self.fused.block_m == 1:
            raise ValueError("the fused kernel has no row variant (block_m 1)")
        if self.shrink is not None and (self.shrink.block_m == 1) != (self.expand.block_m == 1):
            raise ValueError("a shrink and an expand are both row kernels (block_m 1) or neither: they index "
                             "their intermediate differently")
        if self.one_launch and (self.shrink is None or self.shrink.block_m != 1
                                or (self.shrink.num_warps, self.shrink.num_stages)
                                != (self.expand.num_warps, self.expand.num_stages)):
            raise ValueError("one launch is for a row shrink and expand (block_m 1) of the same warps and stages")

    def as_one_launch(self) -> Plan:
        """This row plan run as one launch, the shrink under the expand's warps and stages."""
        expand = self.expand
        return replace(self, shrink=replace(self.shrink, num_warps=expand.num_warps, num_stages=expand.num_stages),
                       one_launch=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: v.to_dict() for k, v in (("fused", self.fused), ("shrink", self.shrink),
                                                          ("expand", self.expand)) if v is not None}
        return d | {"one_launch": True} if self.one_launch else d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> Plan:
        return Plan(**{k: TileConfig.from_dict(v) for k, v in d.items() if k != "one_launch"},
                    one_launch=bool(d.get("one_launch", False)))


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


# The fused kernel recomputes its tokens' x·A in every column chunk: worth it while the adapter's A (rank x K) is
# small next to the B columns a chunk streams, and while there are few tokens per adapter (decode).
FUSED_MAX_TOKENS = 128
FUSED_MAX_K_OVER_WIDTH = 4


def dot_block_r(rank: int) -> int:
    """The register tile of ranks of a kernel that multiplies by the rank with a tensor-core dot (the fused LoRA
    kernel, the merge), for a largest rank `rank`: a power of two, at least 16. It is the merge's one compile-time
    specialisation, and the tuner sizes the fused kernel's shared memory by it."""
    return max(16, 1 << (max(rank, 1) - 1).bit_length())


def row_tiles(tokens: int, segments: int, block_m: int) -> int:
    """Row tiles that cover `segments` segments of `tokens` tokens in all, at worst."""
    return -(-tokens // block_m) + segments - 1


def heuristic_plan(call: CallShape, num_sms: int = 132) -> Plan:
    """Fused for decode-sized calls whose A is not much wider than their output, with about four programs per
    SM; otherwise shrink then expand with the per-kernel heuristic."""
    if call.tokens > FUSED_MAX_TOKENS or call.k > FUSED_MAX_K_OVER_WIDTH * call.width:
        return Plan(shrink=heuristic("shrink", call.op_shape("shrink"), num_sms),
                    expand=heuristic("expand", call.op_shape("expand"), num_sms))
    block_m = _clamp_pow2(-(-call.tokens // max(call.segments, 1)), 16, 64)
    block_n = 64
    block_k = 128 if call.rank <= 32 else 64
    tiles = row_tiles(call.tokens, call.segments, block_m)
    split_n = _clamp_pow2(-(-4 * num_sms // tiles), 1, max(1, call.width // block_n))
    return Plan(fused=TileConfig(block_m, block_n, block_k, 4, 3, split_n=split_n))
