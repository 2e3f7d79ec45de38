"""What one model step needs, built once per step by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from valora.lora.batch import LoRABatch


@dataclass
class PrefillSpan:
    """One sequence with more than one new token: its queries are rows [q_start, q_start + q_len) of the batch
    and it attends over `key_slots` (its whole context, the new tokens included, as KV-cache slots)."""

    q_start: int
    q_len: int
    key_slots: torch.Tensor  # [context_len] int64


@dataclass
class AttentionMeta:
    slot_mapping: torch.Tensor  # [T] int64: KV-cache slot of each new token
    prefills: list[PrefillSpan] = field(default_factory=list)
    decode_rows: torch.Tensor | None = None  # [Bd] rows of the batch that are single-token decodes
    decode_slots: torch.Tensor | None = None  # [Bd, Lmax] key slots, padded with slot 0
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, Lmax] True where the key is real


@dataclass
class ImageInputs:
    """New images of this step, in the order their placeholder tokens appear in the flat batch."""

    data: list[dict[str, torch.Tensor]]  # per image: the processor's tensors (pixel_values, image_grid_thw, ...)
    num_tokens: list[int]  # placeholder tokens per image
    lora_slots: list[int]  # adapter slot of the request that owns each image (-1: none)
    merged_slot: int | None  # the adapter folded into the weights this step, if any
    token_rows: torch.Tensor  # [sum num_tokens] rows of the batch that receive image embeddings
    cached: list[torch.Tensor | None]  # embeddings already computed for an image (recompute after preemption)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T] (M-RoPE) or [T]
    attn: AttentionMeta
    logits_rows: torch.Tensor  # [B] last row of each sequence that samples this step
    lora: LoRABatch | None = None
    images: ImageInputs | None = None
