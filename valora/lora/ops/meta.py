"""Per-step grouping of tokens by adapter slot, built once and shared by every LoRA layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Row-tile heights for which `LoRAMeta.build` precomputes tile maps (every BLOCK_M a kernel config may use).
TILE_HEIGHTS: tuple[int, ...] = (16, 32, 64, 128)


@dataclass(frozen=True)
class LoRAMeta:
    """Tokens grouped into segments of one adapter slot each.

    `token_order` lists the indices of tokens that carry an adapter, grouped by slot (stable within a slot);
    segment `s` covers `token_order[seg_starts[s]:seg_starts[s + 1]]` and uses slot `seg_slots[s]`.
    Tokens with slot -1 appear in no segment and receive no delta. Host copies of the segment layout let
    backends choose tile shapes and launch grids without a device sync. A meta refilled for CUDA graphs
    (`GraphLoRAMeta`) sets `sizes` instead: kernels are sized for that worst case, and the host layout is unknown.

    `tile_maps[bm]` lists, for each row-tile height in TILE_HEIGHTS, the tiles (segment, first position in
    `token_order`) that cover every segment exactly, and their count: a kernel launched over them spends no
    program on the padding rows of short segments or on tokens without an adapter.
    """

    ids: torch.Tensor  # [T] int32, slot per token or -1
    token_order: torch.Tensor  # [T_lora] int64
    seg_starts: torch.Tensor  # [S + 1] int32
    seg_slots: torch.Tensor  # [S] int32
    num_tokens: int
    host_seg_starts: tuple[int, ...]
    host_seg_slots: tuple[int, ...]
    tile_maps: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)
    sizes: tuple[int, int, int] | None = None  # (lora tokens, segments, longest segment) when not the layout's own
    _scratch: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    _flags: dict[torch.device, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_segments(self) -> int:
        return self.sizes[1] if self.sizes else len(self.host_seg_slots)

    @property
    def num_lora_tokens(self) -> int:
        return self.sizes[0] if self.sizes else self.host_seg_starts[-1]

    @property
    def max_segment_len(self) -> int:
        if self.sizes:
            return self.sizes[2]
        starts = self.host_seg_starts
        return max((b - a for a, b in zip(starts, starts[1:])), default=0)

    @property
    def empty(self) -> bool:
        return self.sizes is None and not self.host_seg_slots

    def scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least `numel` elements, reused by every layer of the step.

        Layers run one after another on one stream, so they can share it; it grows only when a wider layer
        needs more, which keeps per-call allocations out of the kernels' path.
        """
        key = (dtype, torch.device(device))
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 1), dtype=dtype, device=device)
            self._scratch[key] = buf
        return buf[:numel]

    def flags(self, numel: int, device: torch.device) -> torch.Tensor:
        """`numel` int32 zeros, kept for every layer of the step: the one-launch row plan counts finished partial
        sums in them and leaves them zero again (ops/kernels.py), so they are zeroed only once, here."""
        device = torch.device(device)
        buf = self._flags.get(device)
        if buf is None or buf.numel() < numel:
            buf = torch.zeros(numel, dtype=torch.int32, device=device)
            self._flags[device] = buf
        return buf[:numel]

    @staticmethod
    def build(ids: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> LoRAMeta:
        host_ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if device is None:
            device = ids.device if isinstance(ids, torch.Tensor) else "cpu"
        order, starts, slots = _segments(host_ids)
        tile_seg, tile_row, spans = _tile_maps(starts, {bm: None for bm in TILE_HEIGHTS})
        tiles = torch.tensor([tile_seg, tile_row], dtype=torch.int32, device=device)  # one host-to-device copy
        return LoRAMeta(
            ids=torch.tensor(host_ids, dtype=torch.int32, device=device),
            token_order=torch.tensor(order, dtype=torch.int64, device=device),
            seg_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
            num_tokens=len(host_ids),
            host_seg_starts=tuple(starts),
            host_seg_slots=tuple(slots),
            tile_maps={bm: (tiles[0, off:], tiles[1, off:], n) for bm, (off, n) in spans.items()},
        )


def _segments(host_ids: list[int]) -> tuple[list[int], list[int], list[int]]:
    """(token order grouped by slot, segment starts, segment slots) of per-token slot ids."""
    by_slot: dict[int, list[int]] = {}
    for t, slot in enumerate(host_ids):
        if slot >= 0:
            by_slot.setdefault(slot, []).append(t)
    slots = sorted(by_slot)
    order: list[int] = []
    starts = [0]
    for slot in slots:
        order.extend(by_slot[slot])
        starts.append(len(order))
    return order, starts, slots


# A tile that covers no row: `row >= end` for every segment, so the program exits at once.
_EMPTY_TILE_ROW = 1 << 30


def _tile_maps(starts: list[int], capacity: dict[int, int | None]) -> tuple[list[int], list[int], dict]:
    """Tile maps (segment, first row) for every row-tile height, concatenated; each padded with empty tiles to
    `capacity[bm]` entries when that is given. Returns the two lists and {bm: (offset, count)}."""
    tile_seg: list[int] = []
    tile_row: list[int] = []
    spans: dict[int, tuple[int, int]] = {}
    for bm, cap in capacity.items():
        pad = -len(tile_seg) % 4  # each map starts 16-byte aligned, so kernels compile one pointer variant
        tile_seg += [0] * pad
        tile_row += [0] * pad
        first = len(tile_seg)
        for s in range(len(starts) - 1):
            for row in range(starts[s], starts[s + 1], bm):
                tile_seg.append(s)
                tile_row.append(row)
        if cap is not None:
            tile_seg += [0] * (first + cap - len(tile_seg))
            tile_row += [_EMPTY_TILE_ROW] * (first + cap - len(tile_row))
        spans[bm] = (first, len(tile_seg) - first)
    return tile_seg, tile_row, spans


class GraphLoRAMeta:
    """The LoRA metadata of one CUDA-graph batch size: a `LoRAMeta` whose tensors are fixed buffers, refilled before
    every replay, and whose kernel sizes are the batch's worst case (every token its own segment, up to
    `max_slots`), so kernels captured once launch the same grids for any mix of adapters; surplus programs find an
    empty tile and exit. Filling costs two host-to-device copies and no sync."""

    def __init__(self, num_tokens: int, max_slots: int, device: torch.device | str) -> None:
        self.num_tokens = num_tokens
        self.max_segments = min(num_tokens, max_slots)
        self.capacity = {bm: -(-num_tokens // bm) + self.max_segments - 1 for bm in TILE_HEIGHTS}
        _, _, spans = _tile_maps([0], self.capacity)
        self.tiles_len = max(off + n for off, n in spans.values())
        s = self.max_segments
        self.ints = torch.zeros(num_tokens + 2 * s + 1 + 2 * self.tiles_len, dtype=torch.int32, device=device)
        self.order = torch.zeros(num_tokens, dtype=torch.int64, device=device)
        # Staging in pinned memory: a copy from pageable memory would wait for the GPU to finish its queue.
        pin = torch.device(device).type == "cuda"
        self._ints_host = torch.zeros(self.ints.shape, dtype=torch.int32, pin_memory=pin)
        self._order_host = torch.zeros(self.order.shape, dtype=torch.int64, pin_memory=pin)
        self._copied = torch.cuda.Event() if pin else None  # the staging buffers may be rewritten after this
        ids, rest = self.ints.split([num_tokens, self.ints.numel() - num_tokens])
        seg_starts, seg_slots, tiles = rest.split([s + 1, s, 2 * self.tiles_len])
        tiles = tiles.view(2, self.tiles_len)
        longest = num_tokens - self.max_segments + 1
        self.meta = LoRAMeta(
            ids=ids, token_order=self.order, seg_starts=seg_starts, seg_slots=seg_slots, num_tokens=num_tokens,
            host_seg_starts=(), host_seg_slots=(),
            tile_maps={bm: (tiles[0, off:], tiles[1, off:], n) for bm, (off, n) in spans.items()},
            sizes=(num_tokens, self.max_segments, longest),
        )

    def fill(self, host_ids: Sequence[int]) -> None:
        """Write the layout of `host_ids` (at most `num_tokens`; the rest are padding tokens without an adapter)."""
        ids = list(host_ids) + [-1] * (self.num_tokens - len(host_ids))
        order, starts, slots = _segments(ids)
        if len(slots) > self.max_segments:
            raise ValueError(f"{len(slots)} adapters in a graph batch sized for {self.max_segments}")
        pad = self.max_segments - len(slots)
        tile_seg, tile_row, _ = _tile_maps(starts, self.capacity)
        host = ids + starts + [starts[-1]] * pad + slots + [0] * pad + tile_seg + tile_row
        if self._copied is not None:
            self._copied.synchronize()
        self._ints_host.copy_(torch.tensor(host, dtype=torch.int32))
        self._order_host.copy_(torch.tensor(order + [0] * (self.num_tokens - len(order)), dtype=torch.int64))
        self.ints.copy_(self._ints_host, non_blocking=True)
        self.order.copy_(self._order_host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()
