"""What every supported LMM family shares: image embeddings that replace the image placeholder tokens of the
shared decoder-only LM (models/decoder.py), an LM head, checkpoint loading through the family's `WeightMapper`,
and the embedding cache that lets a recomputed sequence skip its vision tower.

A family subclasses `VisionLanguageModel`, builds `model` (holding `language_model`, a `DecoderModel`, next to its
vision tower and projector, at the HF module paths), and implements the three steps of a vision pass:
`vision_rows` (how many tower rows the images take), `prepare_vision` (everything the pass needs, built on the host
and copied to the device at once: a `VisionPass`) and `run_vision` (the device work alone, which a CUDA graph can
capture: models/vision_graphs.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from valora.distributed.state import broadcast, tp
from valora.lora.ops.batch import LoRABatch
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.forward_batch import ForwardBatch, ImageInputs
from valora.models.layers.linear import LoRALinear
from valora.models.layers.parallel import ParallelLMHead
from valora.models.layers.uploads import upload_pixels
from valora.models.layers.vit import GRAPH_BACKENDS, VisionSpans, resolve_backend
from valora.models.loader import WeightMapper, load_weights
from valora.multimodal.pixels import PIXEL_TABLE

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


def pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def image_bucket(n: int) -> int:
    """Images (or tiles) of a CUDA-graph pass of fixed-size images: the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ..."""
    p = pow2(n)
    return 3 * p // 4 if 3 * p // 4 >= n and p >= 4 else p


def fixed_size_pass(tower: nn.Module, data: Sequence[dict[str, torch.Tensor]], seq: int, head_dim: int, backend: str,
                    pad: bool, device: torch.device) -> VisionPass:
    """The pass of a tower that sees every image (tile) as one sequence of `seq` rows: each item's `pixel_values`,
    [n_i, C, H, W] uint8 (host), read through its table on the device; `pad` adds blank images up to
    `image_bucket(n)`, each its own span like a real one."""
    pixels = [d["pixel_values"] for d in data]
    n = sum(p.shape[0] for p in pixels)
    total = image_bucket(n) if pad else n
    x = upload_pixels(pixels, [d[PIXEL_TABLE] for d in data], total, tower_dtype(tower), device)
    spans = VisionSpans.build([seq] * total, backend, device, x.dtype, head_dim, num_spans=total if pad else None)
    return VisionPass({"pixels": x}, (spans,), out_rows=0, key=(total,) if pad else None)


def tower_dtype(tower: nn.Module) -> torch.dtype:
    return next(m.weight.dtype for m in tower.modules() if isinstance(m, LoRALinear))


@dataclass
class VisionPass:
    """One pass of a vision tower and its projector over a step's new images, prepared on the host: the device
    tensors it reads (`inputs`, and the spans' own), its attention spans per layout, the LoRA work of its rows (None:
    no adapter reaches the vision side), and how many output rows are real. Padded to a CUDA-graph bucket (`key`),
    every tensor has the bucket's shape, whatever the images, and padding rows attend only among themselves."""

    inputs: dict[str, torch.Tensor]
    spans: tuple[VisionSpans, ...]
    out_rows: int
    lora: dict[str, LoRABatch | None] | None = None
    key: tuple | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every device tensor the pass reads, in a fixed order (what a graph replay refills)."""
        spans = [t for s in self.spans for t in (s.cu_seqlens, s.tiles) if t is not None]
        return [*self.inputs.values(), *spans]

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> VisionPass:
        """The same pass reading `tensors` (as `tensors()` orders them) instead."""
        it = iter(tensors)
        inputs = {k: next(it) for k in self.inputs}
        spans = tuple(dataclasses.replace(s, cu_seqlens=None if s.cu_seqlens is None else next(it),
                                          tiles=None if s.tiles is None else next(it)) for s in self.spans)
        return dataclasses.replace(self, inputs=inputs, spans=spans)


class VisionLanguageModel(nn.Module):
    mapper: ClassVar[WeightMapper]
    # set by the engine: the vision attention backend (vit.ATTENTION_BACKENDS) and the CUDA graphs of the vision pass
    vision_backend: str = "auto"
    vision_graphs = None  # vision_graphs.VisionGraphs

    def __init__(self, hf_config, model: nn.Module) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc = hf_config.text_config
        self.model = model
        self.lm_head = ParallelLMHead(tc.vocab_size, tc.hidden_size)
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

    def vision_rows(self, data: Sequence[dict[str, torch.Tensor]]) -> int:
        """Rows of the vision tower's pass over these images (patches, plus CLS rows where the tower has them)."""
        raise NotImplementedError

    def prepare_vision(self, data: Sequence[dict[str, torch.Tensor]], slots: Sequence[int] | None,
                       merged_slot: int | None, backend: str, pad: bool) -> VisionPass:
        """The pass over these images with attention `backend`; `slots` (one per image) build its LoRA work (None:
        none); `pad` fills it up to its CUDA-graph bucket."""
        raise NotImplementedError

    def run_vision(self, vp: VisionPass) -> torch.Tensor:
        """The pass's device work: embeddings of its rows in the LM's width (padding rows last)."""
        raise NotImplementedError

    def vision_layers(self) -> list[LoRALinear]:
        """The LoRA layers outside the language model (vision tower and projector)."""
        if not hasattr(self, "_vision_layers"):
            self._vision_layers = [m for n, m in self.model.named_modules()
                                   if isinstance(m, LoRALinear) and not n.startswith("language_model.")]
        return self._vision_layers

    def embed_images(self, data: Sequence[dict[str, torch.Tensor]], slots: Sequence[int],
                     merged_slot: int | None) -> torch.Tensor:
        """Embeddings of these images in the LM's width, [sum of their token counts, hidden], in order: one pass of
        the tower over all of them. Replayed from a CUDA graph of the pass's bucket when no adapter reaches the
        vision side (`slots` hold -1 for requests whose adapter does not) and the pass fits the largest bucket."""
        backend = resolve_backend(self.vision_backend, self.lm_head.weight)
        graphs = self.vision_graphs
        if (graphs is not None and backend in GRAPH_BACKENDS and all(s < 0 for s in slots)
                and graphs.fits(self.vision_rows(data))
                and all(m.merged_slot is None for m in self.vision_layers())):
            return graphs.run(self.prepare_vision(data, None, None, backend, pad=True))
        adapted = any(s >= 0 for s in slots) or merged_slot is not None
        vp = self.prepare_vision(data, slots if adapted else None, merged_slot, backend, pad=False)
        return self.run_vision(vp)[: vp.out_rows]

    def encode_images(self, images: ImageInputs) -> torch.Tensor:
        """The rows of this step's images (`spans`), whole images batched through one vision pass, each distinct
        one once; cached ones are reused."""
        groups = images.to_encode()
        if groups:
            todo = [g[0] for g in groups]
            out = self.embed_images([images.data[i] for i in todo], [images.lora_slots[i] for i in todo],
                                    images.merged_slot)
            for group, emb in zip(groups, out.split([images.num_tokens[i] for i in todo])):
                for i in group:
                    images.cached[i] = emb
        return torch.cat([emb[a:b] for emb, (a, b) in zip(images.cached, images.spans)])

    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        """The LM's input rows of the batch: token embeddings, image embeddings at the image placeholders. Under
        tensor parallelism the first rank alone runs the vision pass (it holds the images and their cache) and
        broadcasts the embeddings' rows; the other ranks' `batch.images` carry only `token_rows`."""
        x = self.language_model.embed_tokens(batch.input_ids)
        if batch.images is not None:
            rows = batch.images.token_rows
            emb = (self.encode_images(batch.images).to(x.dtype) if tp().rank == 0
                   else x.new_empty(rows.shape[0], x.shape[1]))
            x = x.index_copy(0, rows, broadcast(emb))
        return x

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        return self.language_model(self.embed(batch), kv_caches, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
