"""LLaVA (`LlavaForConditionalGeneration`): CLIP ViT features of one hidden layer (CLS dropped by the "default"
strategy) through a two-layer MLP projector into a Llama/Mistral/Qwen2 LM with plain RoPE.

Checkpoints come in three layouts: the hub's and transformers' `save_pretrained` (`language_model.model.*`,
`vision_tower.*`, `multi_modal_projector.*`), v5 module paths (`model.language_model.*`, ...), and CLIP towers saved
with their inner `vision_model.` module (transformers < 5.x and the original llava-hf files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers.activations import ACT2FN

from valora.errors import UserError
from valora.lora.ops.batch import LoRABatch
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.layers.linear import LoRALinear
from valora.models.layers.mlp import MLP
from valora.models.layers.norm import LayerNorm
from valora.models.layers.vit import VisionSpans, ViTAttention, patchify
from valora.models.loader import WeightMapper
from valora.models.processing import ImagePromptProcessor
from valora.models.vlm import FUSED_PROJECTIONS, VisionLanguageModel, VisionPass, fixed_size_pass, token_lora
from valora.multimodal.pixels import as_tensor, center_crop, pad_to_square, resize

MAPPER = WeightMapper(
    renames=(
        (r"^language_model\.lm_head$", "lm_head"),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."),
        (r"\.vision_tower\.vision_model\.", ".vision_tower."),
    ),
    packed=FUSED_PROJECTIONS,
    ignore=(r"position_ids$",),
)


def feature_layers(config) -> list[int]:
    """The CLIP hidden states LLaVA reads, as indices into [embeddings, layer 1 output, ..., layer L output]."""
    layers = config.vision_feature_layer
    num = config.vision_config.num_hidden_layers + 1
    return [i % num for i in ([layers] if isinstance(layers, int) else layers)]


class CLIPLayer(nn.Module):
    def __init__(self, vc) -> None:
        super().__init__()
        self.layer_norm1 = LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.self_attn = ViTAttention(vc.hidden_size, vc.num_attention_heads, qkv_bias=True)
        self.layer_norm2 = LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, spans: VisionSpans,
                lora: LoRABatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) with hidden state x + residual; both residual adds ride on the norms."""
        h, residual = (self.layer_norm1(x), x) if residual is None else self.layer_norm1(x, residual)
        h, residual = self.layer_norm2(self.self_attn(h, spans, lora), residual)
        return self.mlp(h, lora), residual


class CLIPVisionTower(nn.Module):
    """`CLIPVisionModel` at its native resolution (LLaVA's processor always resizes to it)."""

    def __init__(self, vc) -> None:
        super().__init__()
        if vc.model_type != "clip_vision_model":
            raise UserError(f"LLaVA vision tower {vc.model_type!r} is not supported (clip_vision_model is)")
        self.patch, self.width = vc.patch_size, vc.hidden_size
        self.head_dim = vc.hidden_size // vc.num_attention_heads
        self.num_positions = (vc.image_size // vc.patch_size) ** 2 + 1
        self.embeddings = nn.Module()
        self.embeddings.class_embedding = nn.Parameter(torch.empty(vc.hidden_size))
        self.embeddings.patch_embedding = LoRALinear(vc.num_channels * vc.patch_size**2, vc.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(self.num_positions, vc.hidden_size)
        self.pre_layrnorm = LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPLayer(vc) for _ in range(vc.num_hidden_layers)])
        self.post_layernorm = LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)  # CLIP's pooled head: unused

    def forward(self, vp: VisionPass, layers: Sequence[int]) -> list[torch.Tensor]:
        """Hidden states `layers` (0 = embeddings) of each image, [images * seq, width]; runs the layers needed."""
        pixels, lora = vp.inputs["pixels"], vp.lora or {}
        n, emb = pixels.shape[0], self.embeddings
        patches = patchify(pixels, self.patch)
        if patches.shape[0] != n * (self.num_positions - 1):
            raise ValueError(f"CLIP expects {self.num_positions - 1} patches per image, got {patches.shape[0] // n}")
        patches = emb.patch_embedding(patches, lora.get("patches"))
        x = torch.cat([emb.class_embedding.expand(n, 1, -1), patches.view(n, -1, self.width)], dim=1)
        x = self.pre_layrnorm((x + emb.position_embedding.weight).view(-1, self.width))
        states, residual = {0: x}, None
        for i, layer in enumerate(self.encoder.layers[: max(layers)], start=1):
            x, residual = layer(x, residual, vp.spans[0], lora.get("rows"))
            if i in layers:
                states[i] = x + residual
        return [states[i] for i in layers]


class LlavaProjector(nn.Module):
    def __init__(self, config, in_features: int) -> None:
        super().__init__()
        bias = getattr(config, "multimodal_projector_bias", True)
        hidden = config.text_config.hidden_size
        self.linear_1 = LoRALinear(in_features, hidden, bias=bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = LoRALinear(hidden, hidden, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x, lora)), lora)


class LlavaModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.vision_tower = CLIPVisionTower(config.vision_config)
        in_features = config.vision_config.hidden_size * len(feature_layers(config))
        self.multi_modal_projector = LlavaProjector(config, in_features)
        self.language_model = DecoderModel(DecoderConfig.from_hf(config.text_config))


class LlavaForConditionalGeneration(VisionLanguageModel):
    mapper = MAPPER

    def __init__(self, hf_config) -> None:
        super().__init__(hf_config, LlavaModel(hf_config))
        self.layers = feature_layers(hf_config)
        self.keep_cls = hf_config.vision_feature_select_strategy == "full"

    def vision_rows(self, data) -> int:
        return sum(d["pixel_values"].shape[0] for d in data) * self.model.vision_tower.num_positions

    def prepare_vision(self, data, slots, merged_slot, backend, pad) -> VisionPass:
        tower, dev = self.model.vision_tower, self.lm_head.weight.device
        vp = fixed_size_pass(tower, data, tower.num_positions, tower.head_dim, backend, pad, dev)
        n, seq = sum(d["pixel_values"].shape[0] for d in data), tower.num_positions
        tokens = seq if self.keep_cls else seq - 1
        vp.out_rows = n * tokens
        if slots is not None:
            vp.lora = {"patches": token_lora(slots, [seq - 1] * n, merged_slot, dev),
                       "rows": token_lora(slots, [seq] * n, merged_slot, dev),
                       "tokens": token_lora(slots, [tokens] * n, merged_slot, dev)}
        return vp

    def run_vision(self, vp: VisionPass) -> torch.Tensor:
        tower = self.model.vision_tower
        n, seq = vp.inputs["pixels"].shape[0], tower.num_positions
        feats = torch.cat([s.view(n, seq, -1) for s in tower(vp, self.layers)], dim=-1)
        if not self.keep_cls:
            feats = feats[:, 1:]
        return self.model.multi_modal_projector(feats.reshape(-1, feats.shape[-1]), (vp.lora or {}).get("tokens"))


class LlavaInputProcessor(ImagePromptProcessor):
    """`<image>` -> one token per feature: (H/p)(W/p) patches, plus the CLS with the "full" strategy, as
    `LlavaProcessor` counts them. Pixels as CLIP's image processor makes them (LLaVA's own pads to a square of the
    mean colour first): the shorter side resized to `size`, the centre crop of `crop_size`."""

    def __init__(self, model_dir: str | Path, hf_config, tokenizer) -> None:
        super().__init__(model_dir, tokenizer, hf_config.image_token_id)
        self.patch = hf_config.vision_config.patch_size
        self.extra = 1 if hf_config.vision_feature_select_strategy == "full" else 0
        c = self.config
        self.pad_color = tuple(int(x * 255) for x in c.image_mean) if getattr(c, "do_pad", False) else None
        if c.do_resize and not (c.size.shortest_edge and not c.size.longest_edge or c.size.height and c.size.width):
            raise ValueError(f"LLaVA image processor size {dict(c.size)} is not supported "
                             "(shortest_edge, or height and width, are)")

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        size = self.config.size
        if not size.shortest_edge:
            return size.height, size.width
        short, long = sorted((height, width))
        long = int(size.shortest_edge * long / short)  # as HF's get_resize_output_image_size rounds it
        return (long, size.shortest_edge) if width <= height else (size.shortest_edge, long)

    def image_pixels(self, image: Image.Image) -> torch.Tensor:
        c = self.config
        if self.pad_color is not None:
            image = pad_to_square(image, self.pad_color)
        if c.do_resize:
            image = resize(image, *self._resized(image.height, image.width), self.resample)
        pixels = as_tensor(image)
        if c.do_center_crop:
            pixels = center_crop(pixels, c.crop_size.height, c.crop_size.width)
        return pixels

    def pixel_tensors(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.normalize.tensors("pixel_values", pixels.permute(2, 0, 1)[None])

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        h, w = data["pixel_values"].shape[-2:]
        return (h // self.patch) * (w // self.patch) + self.extra
