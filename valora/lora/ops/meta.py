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
    backends choose tile shapes and launch grids without a device sync.

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
    _scratch: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_segments(self) -> int:
        return len(self.host_seg_slots)

    @property
    def num_lora_tokens(self) -> int:
        return self.host_seg_starts[-1]

    @property
    def max_segment_len(self) -> int:
        starts = self.host_seg_starts
        return max((b - a for a, b in zip(starts, starts[1:])), default=0)

    @property
    def empty(self) -> bool:
        return not self.host_seg_slots

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

    @staticmethod
    def build(ids: Sequence[int] | torch.Tensor, device: torch.device | str | None = None) -> LoRAMeta:
        host_ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if device is None:
            device = ids.device if isinstance(ids, torch.Tensor) else "cpu"
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
        tile_seg: list[int] = []
        tile_row: list[int] = []
        spans: dict[int, tuple[int, int]] = {}
        for bm in TILE_HEIGHTS:
            pad = -len(tile_seg) % 4  # each map starts 16-byte aligned, so kernels compile one pointer variant
            tile_seg += [0] * pad
            tile_row += [0] * pad
            first = len(tile_seg)
            for s in range(len(slots)):
                for row in range(starts[s], starts[s + 1], bm):
                    tile_seg.append(s)
                    tile_row.append(row)
            spans[bm] = (first, len(tile_seg) - first)
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
