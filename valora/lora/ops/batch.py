"""The LoRA work of one forward pass, built once per step and read by every LoRA layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from valora.lora.ops import LoRAMeta


@dataclass(frozen=True)
class LoRABatch:
    """Each token's own adapter (`own`), and, while an adapter is merged into the weights, the tokens that must
    take it back out (`correction`: the merged adapter's slot, applied with negated scaling).

    Tokens of the merged adapter need no LoRA work at all; a token of another adapter j computes
    W'x + s_j B_j A_j x - s_m B_m A_m x, the mixture mode; a base-model token only subtracts.
    """

    own: LoRAMeta | None
    correction: LoRAMeta | None = None

    @staticmethod
    def build(slots: Sequence[int], merged_slot: int | None, device: torch.device | str) -> LoRABatch | None:
        own = [s if s != merged_slot else -1 for s in slots]
        own_meta = LoRAMeta.build(own, device) if any(s >= 0 for s in own) else None
        corr_meta = None
        if merged_slot is not None:
            corr = [merged_slot if s != merged_slot else -1 for s in slots]
            corr_meta = LoRAMeta.build(corr, device) if any(s >= 0 for s in corr) else None
        if own_meta is None and corr_meta is None:
            return None
        return LoRABatch(own_meta, corr_meta)
