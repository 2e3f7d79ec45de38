"""What one model step needs, built once per step by the model runner and shared by every layer."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

from valora.lora.ops.batch import LoRABatch
from valora.models.layers.attention import AttentionMeta


@dataclass
class ImageInputs:
    """Images whose placeholder tokens are in this step, in the order they appear in the flat batch. A prompt
    computed in chunks may take only some of an image's rows in a step (`spans`); its embedding is computed once,
    by the first chunk that reaches it, and the owner keeps it for the chunks that follow."""

    data: list[dict[str, torch.Tensor]]  # per image: the processor's tensors (pixel_values, image_grid_thw, ...)
    num_tokens: list[int]  # placeholder tokens per image
    lora_slots: list[int]  # adapter slot of the request that owns each image (-1: none)
    merged_slot: int | None  # the adapter folded into the weights this step, if any
    token_rows: torch.Tensor  # [sum of span lengths] rows of the batch that receive image embeddings
    cached: list[torch.Tensor | None]  # embeddings already computed (an earlier chunk, recompute after preemption)
    spans: list[tuple[int, int]]  # rows [start, end) of each image's embedding that this step's tokens take
    keys: list[Hashable] = field(default_factory=list)  # each embedding's identity (content hash, vision adapter)

    def to_encode(self) -> list[list[int]]:
        """The images the vision pass still has to encode, grouped by embedding: the same picture sent by several
        requests of one step (video frames, a shared reference image) is encoded once (without `keys`, each image
        is its own group)."""
        groups: dict[Hashable, list[int]] = {}
        for i, emb in enumerate(self.cached):
            if emb is None:
                groups.setdefault(self.keys[i] if self.keys else i, []).append(i)
        return list(groups.values())


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T] (M-RoPE) or [T]
    attn: AttentionMeta
    logits_rows: torch.Tensor  # [B] last row of each sequence that samples this step
    lora: LoRABatch | None = None
    images: ImageInputs | None = None
    # What `lora` is built from, on the host: each row's adapter slot (-1: none) and the merged adapter's slot.
    # A CUDA-graph replay refills its static LoRA metadata from these instead.
    lora_slots: list[int] = field(default_factory=list)
    merged_slot: int | None = None

    def build_lora(self) -> None:
        self.lora = LoRABatch.build(self.lora_slots, self.merged_slot, self.input_ids.device)
