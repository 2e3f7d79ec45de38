"""InternVL (transformers' native `InternVLForConditionalGeneration`): InternViT over 448-pixel tiles, pixel shuffle
(2x2 neighbouring patches into one token), an MLP projector, and a Qwen2 (or Llama) LM with plain RoPE.

A large image becomes several tiles plus a thumbnail, cut by the checkpoint's GotOcr2 image processor as
`InternVLProcessor` asks it to; each tile gives `image_seq_length` tokens between `<img>` and `</img>`.
"""

from __future__ import annotations

import functools
import json
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
from valora.models.layers.norm import LayerNorm, RMSNorm
from valora.models.layers.vit import VisionSpans, ViTAttention, patchify
from valora.models.loader import WeightMapper
from valora.models.processing import ImagePromptProcessor, Run, video_settings
from valora.models.vlm import FUSED_PROJECTIONS, VisionLanguageModel, VisionPass, fixed_size_pass, token_lora
from valora.multimodal.pixels import PixelNormalizer, as_tensor, content_hash, resize
from valora.multimodal.video import Video

MAPPER = WeightMapper(
    renames=(
        (r"^language_model\.lm_head$", "lm_head"),
        (r"^language_model\.model\.", "model.language_model."),
        (r"^(vision_tower|multi_modal_projector)\.", r"model.\1."),
        (r"\.attention\.projection_layer$", ".attention.out_proj"),
    ),
    packed=FUSED_PROJECTIONS,
)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _norm(vc) -> nn.Module:
    return RMSNorm(vc.hidden_size, vc.layer_norm_eps) if vc.norm_type == "rms_norm" else \
        LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)


class InternVisionLayer(nn.Module):
    def __init__(self, vc) -> None:
        super().__init__()
        self.attention = ViTAttention(vc.hidden_size, vc.num_attention_heads, qkv_bias=vc.attention_bias,
                                      qk_norm_eps=1e-6 if vc.use_qk_norm else None)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, vc.hidden_act)
        self.layernorm_before = _norm(vc)
        self.layernorm_after = _norm(vc)
        self.lambda_1 = nn.Parameter(torch.empty(vc.hidden_size))  # layer scale
        self.lambda_2 = nn.Parameter(torch.empty(vc.hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, scale: torch.Tensor | None,
                spans: VisionSpans, lora: LoRABatch | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) with hidden state residual + scale * x (`scale`: the previous layer's lambda_2):
        both residual adds and both layer scales ride on the norms. The output's own scale is `lambda_2`."""
        h, residual = (self.layernorm_before(x), x) if residual is None else self.layernorm_before(x, residual, scale)
        h, residual = self.layernorm_after(self.attention(h, spans, lora), residual, self.lambda_1)
        return self.mlp(h, lora), residual


class InternVisionTower(nn.Module):
    """`InternVLVisionModel` at its native tile size (the image processor always cuts tiles of it)."""

    def __init__(self, vc) -> None:
        super().__init__()
        if not vc.use_absolute_position_embeddings:
            raise UserError("InternViT without absolute position embeddings is not supported")
        (ih, iw), (ph, pw) = _pair(vc.image_size), _pair(vc.patch_size)
        if ph != pw:
            raise UserError(f"non-square patches {ph}x{pw} are not supported")
        self.patch, self.width = ph, vc.hidden_size
        self.head_dim = vc.hidden_size // vc.num_attention_heads
        self.seq = (ih // ph) * (iw // pw) + 1
        self.embeddings = nn.Module()
        self.embeddings.cls_token = nn.Parameter(torch.empty(1, 1, vc.hidden_size))
        self.embeddings.patch_embeddings = nn.Module()
        self.embeddings.patch_embeddings.projection = LoRALinear(vc.num_channels * ph * pw, vc.hidden_size, bias=True)
        self.embeddings.position_embeddings = nn.Parameter(torch.empty(1, self.seq, vc.hidden_size))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([InternVisionLayer(vc) for _ in range(vc.num_hidden_layers)])
        self.layernorm = None if vc.use_mean_pooling else LayerNorm(vc.hidden_size, eps=vc.layer_norm_eps)

    def forward(self, vp: VisionPass, layer: int) -> torch.Tensor:
        """Hidden state `layer` (as `vision_feature_layer`: -1 is the final output) of every tile, [tiles, seq, w]."""
        pixels, lora = vp.inputs["pixels"], vp.lora or {}
        n, emb = pixels.shape[0], self.embeddings
        patches = patchify(pixels, self.patch)
        if patches.shape[0] != n * (self.seq - 1):
            raise ValueError(f"InternViT expects {self.seq - 1} patches per tile, got {patches.shape[0] // n}")
        patches = emb.patch_embeddings.projection(patches, lora.get("patches")).view(n, -1, self.width)
        x = (torch.cat([emb.cls_token.expand(n, 1, -1), patches], dim=1) + emb.position_embeddings).view(-1, self.width)
        depth = len(self.encoder.layer)
        residual = scale = None
        for blk in self.encoder.layer[: depth if layer == -1 else layer % (depth + 1)]:
            x, residual = blk(x, residual, scale, vp.spans[0], lora.get("rows"))
            scale = blk.lambda_2
        final_norm = self.layernorm if layer == -1 else None
        if residual is None:
            x = x if final_norm is None else final_norm(x)
        elif final_norm is not None:
            x = final_norm(x, residual, scale)[0]
        else:
            x = residual + scale * x
        return x.view(n, self.seq, self.width)


def pixel_shuffle(x: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, W, H, C] -> [B, H*s, W*s, C/s^2] exactly as `InternVLModel.pixel_shuffle` orders it."""
    b, w, h, c = x.shape
    x = x.view(b, w, int(h * scale), int(c / scale)).permute(0, 2, 1, 3).contiguous()
    x = x.view(b, int(h * scale), int(w * scale), int(c / (scale * scale)))
    return x.permute(0, 2, 1, 3).contiguous()


class InternVLProjector(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        width = config.vision_config.hidden_size * int(1 / config.downsample_ratio) ** 2
        hidden = config.text_config.hidden_size
        self.layer_norm = nn.LayerNorm(width)
        self.linear_1 = LoRALinear(width, hidden, bias=True)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = LoRALinear(hidden, hidden, bias=True)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x), lora)), lora)


class InternVLModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.vision_tower = InternVisionTower(config.vision_config)
        self.multi_modal_projector = InternVLProjector(config)
        self.language_model = DecoderModel(DecoderConfig.from_hf(config.text_config))


def tile_tokens(config) -> int:
    """LM tokens per tile: patches of a tile after pixel shuffle (the processor's `image_seq_length`)."""
    (ih, iw), (ph, pw) = _pair(config.vision_config.image_size), _pair(config.vision_config.patch_size)
    return int((ih // ph) * (iw // pw) * config.downsample_ratio**2)


class InternVLForConditionalGeneration(VisionLanguageModel):
    mapper = MAPPER

    def __init__(self, hf_config) -> None:
        super().__init__(hf_config, InternVLModel(hf_config))
        if not isinstance(hf_config.vision_feature_layer, int):
            raise UserError("InternVL with several vision_feature_layer values is not supported")
        self.layer = hf_config.vision_feature_layer
        self.keep_cls = hf_config.vision_feature_select_strategy == "full"
        self.scale = hf_config.downsample_ratio
        self.tile_tokens = tile_tokens(hf_config)

    def vision_rows(self, data) -> int:
        return sum(d["pixel_values"].shape[0] for d in data) * self.model.vision_tower.seq

    def prepare_vision(self, data, slots, merged_slot, backend, pad) -> VisionPass:
        tower, dev = self.model.vision_tower, self.lm_head.weight.device
        vp = fixed_size_pass(tower, data, tower.seq, tower.head_dim, backend, pad, dev)
        n = sum(d["pixel_values"].shape[0] for d in data)
        vp.out_rows = n * self.tile_tokens
        if slots is not None:
            tiles = [d["pixel_values"].shape[0] for d in data]
            tile_slots = [s for s, t in zip(slots, tiles) for _ in range(t)]
            vp.lora = {"patches": token_lora(tile_slots, [tower.seq - 1] * n, merged_slot, dev),
                       "rows": token_lora(tile_slots, [tower.seq] * n, merged_slot, dev),
                       "tokens": token_lora(tile_slots, [self.tile_tokens] * n, merged_slot, dev)}
        return vp

    def run_vision(self, vp: VisionPass) -> torch.Tensor:
        feats = self.model.vision_tower(vp, self.layer)
        if not self.keep_cls:
            feats = feats[:, 1:]
        n, side = feats.shape[0], int(feats.shape[1] ** 0.5)
        feats = pixel_shuffle(feats.reshape(n, side, side, -1), self.scale)
        return self.model.multi_modal_projector(feats.reshape(n * feats.shape[1] * feats.shape[2], -1),
                                                (vp.lora or {}).get("tokens"))


@functools.lru_cache(maxsize=1024)
def tile_grid(height: int, width: int, tile_height: int, tile_width: int, min_tiles: int,
              max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of tiles for an image, as GotOcr2's `get_optimal_tiled_canvas` picks them: the grid whose
    aspect ratio is closest to the image's, fewer tiles first; on a tie the larger grid wins while the image
    covers more than half of its area."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
                    if min_tiles <= c * r <= max_tiles), key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for c, r in grids:
        diff = abs(aspect - c / r)
        if diff < best_diff:
            best, best_diff = (c, r), diff
        elif diff == best_diff and area > 0.5 * tile_height * tile_width * c * r:
            best = (c, r)
    return best


class InternVLInputProcessor(ImagePromptProcessor):
    """`<IMG_CONTEXT>` -> `<img>` + `<IMG_CONTEXT>` x (tiles * image_seq_length) + `</img>`, as `InternVLProcessor`
    does; tiles as the GotOcr2 image processor cuts them with `crop_to_patches`, the processor's default: the image
    resized onto the best grid of tiles, row by row, then (when there is more than one) the whole image as a
    thumbnail tile. A video (`<video>`) becomes its frames as images, one tile each, labelled `Frame1: ` ... and
    one per line, as `InternVLProcessor` writes them."""

    def __init__(self, model_dir: str | Path, hf_config, tokenizer) -> None:
        missing = [a for a in ("start_image_token", "end_image_token") if getattr(tokenizer, a, None) is None]
        if missing:
            raise UserError(f"InternVL tokenizer lacks the named special tokens {missing} (extra_special_tokens)")
        self.image_start, self.image_end = tokenizer.start_image_token, tokenizer.end_image_token
        self.video_token = getattr(tokenizer, "video_token", None)
        super().__init__(model_dir, tokenizer, hf_config.image_token_id)
        self.tile_tokens = tile_tokens(hf_config)
        c = self.config
        self.tile = (c.size.height, c.size.width)
        self.max_tiles = c.max_patches if c.max_patches > 1 else 1
        self.min_tiles = c.min_patches
        # A video frame is one tile, resized whole (InternVLVideoProcessor); settings the video config leaves out
        # are the image processor's.
        video = video_settings(model_dir)
        size = video.get("size") or {"height": c.size.height, "width": c.size.width}
        self.video_tile = (size["height"], size["width"])
        self.video_resample = int(video.get("resample", self.resample))
        self.video_normalize = PixelNormalizer.build(
            video.get("do_rescale", c.do_rescale), video.get("rescale_factor", c.rescale_factor),
            video.get("do_normalize", c.do_normalize), video.get("image_mean", c.image_mean),
            video.get("image_std", c.image_std))
        self.video_hash_key = json.dumps([type(self).__name__, "video", video], sort_keys=True).encode()

    def image_pixels(self, image: Image.Image) -> torch.Tensor:
        """[tiles, H, W, 3]: the grid's tiles row by row, then (with more than one) the whole image as one more."""
        (th, tw), rows, cols = self.tile, 1, 1
        if self.max_tiles > 1:
            cols, rows = tile_grid(image.height, image.width, th, tw, self.min_tiles, self.max_tiles)
        tiles = as_tensor(resize(image, rows * th, cols * tw, self.resample))
        tiles = tiles.view(rows, th, cols, tw, 3).transpose(1, 2).reshape(rows * cols, th, tw, 3)
        if rows * cols > 1:
            tiles = torch.cat([tiles, as_tensor(resize(image, th, tw, self.resample))[None]])
        return tiles

    def pixel_tensors(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.normalize.tensors("pixel_values", pixels.permute(0, 3, 1, 2))

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        return data["pixel_values"].shape[0] * self.tile_tokens

    def video_runs(self, video: Video) -> list[Run]:
        """A run per frame, each frame one tile, as `InternVLProcessor` gives a video."""
        h, w = self.video_tile
        runs = []
        for frame in video.frames:
            tile = as_tensor(resize(frame, h, w, self.video_resample))
            runs.append(Run(self.image_token_id,
                            self.video_normalize.tensors("pixel_values", tile[None].permute(0, 3, 1, 2)),
                            self.tile_tokens, content_hash(self.video_hash_key, tile)))
        return runs

    def video_text(self, runs: Sequence[Run]) -> str:
        return "\n".join(f"Frame{i + 1}: {self.run_text(run)}" for i, run in enumerate(runs))
