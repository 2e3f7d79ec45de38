"""Per-step grouping of tokens by adapter slot, built once and shared by every LoRA layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAMeta:
    """Tokens grouped into segments of one adapter slot each.

    `token_order` lists the indices of tokens that carry an adapter, grouped by slot (stable within a slot);
    segment `s` covers `token_order[seg_starts[s]:seg_starts[s + 1]]` and uses slot `seg_slots[s]`.
    Tokens with slot -1 appear in no segment and receive no delta. Host copies of the segment layout let
    backends choose tile shapes and launch grids without a device sync.
    """

    ids: torch.Tensor  # [T] int32, slot per token or -1
    token_order: torch.Tensor  # [T_lora] int64
    seg_starts: torch.Tensor  # [S + 1] int32
    seg_slots: torch.Tensor  # [S] int32
    num_tokens: int
    host_seg_starts: tuple[int, ...]
    host_seg_slots: tuple[int, ...]

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
        return LoRAMeta(
            ids=torch.tensor(host_ids, dtype=torch.int32, device=device),
            token_order=torch.tensor(order, dtype=torch.int64, device=device),
            seg_starts=torch.tensor(starts, dtype=torch.int32, device=device),
            seg_slots=torch.tensor(slots, dtype=torch.int32, device=device),
            num_tokens=len(host_ids),
            host_seg_starts=tuple(starts),
            host_seg_slots=tuple(slots),
        )
