"""What every supported LMM family shares: image embeddings that replace the image placeholder tokens of the
shared decoder-only LM (models/decoder.py), an LM head, checkpoint loading through the family's `WeightMapper`,
and the embedding cache that lets a recomputed sequence skip its vision tower.

A family subclasses `VisionLanguageModel`, builds `model` (holding `language_model`, a `DecoderModel`, next to its
vision tower and projector, at the HF module paths), and implements `embed_images`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import nn

from valora.lora.ops.batch import LoRABatch
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.forward_batch import ForwardBatch, ImageInputs
from valora.models.loader import WeightMapper, load_weights

# The shared decoder fuses q/k/v and gate/up (and so do the vision towers that have them): checkpoint and PEFT
# names of those leaves land in one output slice of the fused layer.
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def token_lora(slots: Sequence[int], counts: Sequence[int], merged_slot: int | None,
               device: torch.device) -> LoRABatch | None:
    """LoRA work for rows that come in runs: `counts[i]` consecutive rows belong to an image of adapter `slots[i]`."""
    return LoRABatch.build([s for s, n in zip(slots, counts) for _ in range(n)], merged_slot, device)


class VisionLanguageModel(nn.Module):
    mapper: ClassVar[WeightMapper]

    def __init__(self, hf_config, model: nn.Module) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc = hf_config.text_config
        self.model = model
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False) or
                                        getattr(tc, "tie_word_embeddings", False))
        for p in self.parameters():
            p.requires_grad_(False)

    @property
    def language_model(self) -> DecoderModel:
        return self.model.language_model

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.language_model.config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = {"lm_head.weight": "model.language_model.embed_tokens.weight"} if self.tie_word_embeddings else None
        load_weights(self, iter(weights), self.mapper, tied)

    def embed_images(self, data: Sequence[dict[str, torch.Tensor]], slots: Sequence[int],
                     merged_slot: int | None) -> torch.Tensor:
        """Embeddings of these images in the LM's width, [sum of their token counts, hidden], in order."""
        raise NotImplementedError

    def encode_images(self, images: ImageInputs) -> torch.Tensor:
        """Embeddings for this step's images, batched through one vision pass; cached ones are reused."""
        todo = [i for i, c in enumerate(images.cached) if c is None]
        if todo:
            out = self.embed_images([images.data[i] for i in todo], [images.lora_slots[i] for i in todo],
                                    images.merged_slot)
            for i, emb in zip(todo, out.split([images.num_tokens[i] for i in todo])):
                images.cached[i] = emb
        return torch.cat(images.cached)

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        lm = self.language_model
        x = lm.embed_tokens(batch.input_ids)
        if batch.images is not None:
            x = x.index_copy(0, batch.images.token_rows, self.encode_images(batch.images).to(x.dtype))
        return lm(x, kv_caches, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
