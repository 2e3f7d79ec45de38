"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): ViT with 2D RoPE and a 2x2 patch merger, Qwen2 LM with M-RoPE.

One file per family: the vision tower, how its tokens enter the language model, its checkpoint names, and its
prompt preprocessing (placeholder expansion and 3D positions) live here. Qwen2.5-VL reuses it with its own
vision blocks and attention windows (qwen2_5_vl.py).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from valora.lora.ops.batch import LoRABatch
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.layers import fused_kernels
from valora.models.layers.linear import LoRALinear
from valora.models.layers.mlp import MLP
from valora.models.layers.norm import LayerNorm
from valora.models.layers.rotary import Rope, make_rope
from valora.models.layers.uploads import upload, upload_pixels
from valora.models.layers.vit import VisionSpans, vit_attention
from valora.models.loader import WeightMapper
from valora.models.processing import ImagePromptProcessor, Run, video_settings
from valora.models.vlm import FUSED_PROJECTIONS, VisionLanguageModel, VisionPass, pow2, token_lora
from valora.multimodal.inputs import ImageItem, InputError
from valora.multimodal.pixels import PIXEL_TABLE, PixelNormalizer, as_tensor, content_hash, resize
from valora.multimodal.video import Video

# Hub checkpoints predate transformers v5 and keep the LM at `model.*` and the ViT at `visual.*`.
MAPPER = WeightMapper(
    renames=((r"^visual\.", "model.visual."), (r"^model\.(?!visual\.|language_model\.)", "model.language_model.")),
    packed=FUSED_PROJECTIONS,
    ignore=(r"rotary_emb\.inv_freq$",),
)


ROW_BUCKET = 256  # a pass padded for a CUDA graph has a multiple of this many rows
PAD_SPAN = 64  # its padding rows attend among themselves, in spans of at most this many rows


@functools.lru_cache(maxsize=1024)
def grid_positions(t: int, h: int, w: int, merge: int) -> np.ndarray:
    """(row, column) of every patch of a (t, h, w) grid, [2, t*h*w], in the processor's patch order: merge units
    row-major, the merge x merge patches of a unit together, frame after frame."""
    shape = (h // merge, merge, w // merge, merge)
    hp = np.broadcast_to(np.arange(h).reshape(h // merge, merge, 1, 1), shape).transpose(0, 2, 1, 3)
    wp = np.broadcast_to(np.arange(w).reshape(1, 1, w // merge, merge), shape).transpose(0, 2, 1, 3)
    return np.tile(np.stack([hp.reshape(-1), wp.reshape(-1)]), (1, t))


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = LoRALinear(dim, 3 * dim, bias=True)
        self.proj = LoRALinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: Rope, spans: VisionSpans, lora: LoRABatch | None) -> torch.Tensor:
        qkv = self.qkv(x, lora).view(x.shape[0], 3, self.num_heads, self.head_dim)
        q, k = rope(qkv[:, 0], qkv[:, 1])
        return self.proj(vit_attention(q, k, qkv[:, 2], spans).view(x.shape[0], -1), lora)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(dim, eps=1e-6)
        self.norm2 = norm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, residual, rope, spans, lora) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, residual) of a pre-norm block whose hidden state is x + residual: both residual adds ride on
        the norms (the first block gets residual None)."""
        h, residual = (self.norm1(x), x) if residual is None else self.norm1(x, residual)
        h, residual = self.norm2(self.attn(h, rope, spans, lora), residual)
        return self.mlp(h, lora), residual


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = norm(dim, eps=1e-6)
        self.mlp = nn.ModuleList([LoRALinear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                  LoRALinear(self.hidden, out_dim, bias=True)])

    def forward(self, x, residual, lora):
        x = self.ln_q(x, residual)[0].view(-1, self.hidden)
        return self.mlp[2](self.mlp[1](self.mlp[0](x, lora)), lora)


class Qwen2VisionTower(nn.Module):
    """Qwen2-VL's ViT over packed patches of any number of images. Subclasses choose the block (`make_block`), the
    norm, the widths (`from_config`) and which patches attend to which (`layout`)."""

    norm: ClassVar[type[nn.Module]] = LayerNorm

    def __init__(self, vc, width: int, out_dim: int) -> None:
        super().__init__()
        self.merge, self.width = vc.spatial_merge_size, width
        self.head_dim = width // vc.num_heads
        # The patch embedding is a Conv3d whose stride equals its kernel: a linear map of each flattened patch.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = LoRALinear(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, width)
        # 2D RoPE: the first half of the rotary frequencies turn with the patch's row, the second with its column
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        quarter = self.head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
        self.register_buffer("rope_inv_freq", torch.cat([inv_freq, inv_freq]), persistent=False)
        self.register_buffer("rope_axis", torch.arange(2).repeat_interleave(inv_freq.numel()), persistent=False)
        self.blocks = nn.ModuleList([self.make_block(vc) for _ in range(vc.depth)])
        self.block_layout = [0] * vc.depth  # which of `layout`'s span lists each block attends within
        self.merger = PatchMerger(out_dim, width, vc.spatial_merge_size, self.norm)

    @classmethod
    def from_config(cls, vc) -> Qwen2VisionTower:
        return cls(vc, vc.embed_dim, vc.hidden_size)

    def make_block(self, vc) -> nn.Module:
        return VisionBlock(self.width, vc.num_heads, MLP(self.width, int(self.width * vc.mlp_ratio), vc.hidden_act),
                           self.norm)

    def layout(self, grids: Sequence[Sequence[int]]) -> tuple[np.ndarray | None, list[list[int]]]:
        """The order of merge units through the blocks (None: as given) and the attention spans (in patches) of each
        layout (`block_layout` picks one per block). Qwen2-VL attends within each image frame."""
        return None, [[h * w for t, h, w in grids for _ in range(t)]]

    def prepare(self, pixels: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], grids: Sequence[Sequence[int]],
                backend: str, pad: bool, device: torch.device) -> VisionPass:
        """The pass over the uint8 patches `pixels` ([patches, C*T*P*P] per item, host; each item's values read
        from its `tables` entry on the device: `upload_pixels`) of items `grids`; `pad` adds
        padding rows up to a multiple of ROW_BUCKET and pads the span tables to powers of two (the CUDA-graph
        bucket)."""
        unit = self.merge**2
        patches = sum(p.shape[0] for p in pixels)
        order, layouts = self.layout(grids)
        positions = np.concatenate([grid_positions(*g, self.merge) for g in grids], axis=1)
        rows = -(-patches // ROW_BUCKET) * ROW_BUCKET if pad else patches
        extra = rows - patches
        if extra:
            layouts = [[*spans, *[PAD_SPAN] * (extra // PAD_SPAN), *([extra % PAD_SPAN] if extra % PAD_SPAN else [])]
                       for spans in layouts]
            positions = np.pad(positions, ((0, 0), (0, extra)))
        dtype = self.patch_embed.proj.weight.dtype
        inputs = {"pixels": upload_pixels(pixels, tables, rows, dtype, device)}
        if order is not None:
            order = np.concatenate([order, np.arange(patches // unit, rows // unit)])
            patch_order = (order[:, None] * unit + np.arange(unit)).reshape(-1)
            positions = positions[:, patch_order]
            inputs["order"] = upload(patch_order, device)
            inputs["inverse"] = upload(np.argsort(order), device)
        inputs["positions"] = upload(positions.astype(np.int32), device)
        bounds = [(pow2(len(spans)), pow2(max(spans))) if pad else (None, None) for spans in layouts]
        spans = tuple(VisionSpans.build(lengths, backend, device, dtype, self.head_dim, num_spans=n, max_len=m)
                      for lengths, (n, m) in zip(layouts, bounds))
        return VisionPass(inputs, spans, out_rows=patches // unit, key=(rows, *bounds) if pad else None)

    def forward(self, vp: VisionPass) -> torch.Tensor:
        inputs, lora = vp.inputs, vp.lora or {}
        x = inputs["pixels"]
        if "order" in inputs:  # reordering keeps every patch inside its image's rows: per-row adapters still hold
            x = x.index_select(0, inputs["order"])
        x = self.patch_embed.proj(x, lora.get("patches"))
        rope = make_rope(inputs["positions"], self.rope_inv_freq, self.rope_axis,
                         fused=fused_kernels.use_triton(x), fp32=True)
        residual = None
        for blk, layout in zip(self.blocks, self.block_layout):
            x, residual = blk(x, residual, rope, vp.spans[layout], lora.get("patches"))
        x = self.merger(x, residual, lora.get("units"))
        return x.index_select(0, inputs["inverse"]) if "inverse" in inputs else x


class Qwen2VLModel(nn.Module):
    def __init__(self, hf_config, tower: type[Qwen2VisionTower]) -> None:
        super().__init__()
        self.visual = tower.from_config(hf_config.vision_config)
        self.language_model = DecoderModel(DecoderConfig.from_hf(hf_config.text_config))


class Qwen2VLForConditionalGeneration(VisionLanguageModel):
    mapper = MAPPER
    tower: ClassVar[type[Qwen2VisionTower]] = Qwen2VisionTower

    def __init__(self, hf_config) -> None:
        super().__init__(hf_config, Qwen2VLModel(hf_config, self.tower))

    def vision_rows(self, data) -> int:
        return sum(int(vision_input(d)[1].prod()) for d in data)

    def prepare_vision(self, data, slots, merged_slot, backend, pad) -> VisionPass:
        dev = self.lm_head.weight.device
        grids = [vision_input(d)[1].view(-1).tolist() for d in data]
        vp = self.model.visual.prepare([vision_input(d)[0] for d in data], [d[PIXEL_TABLE] for d in data], grids,
                                       backend, pad, dev)
        if slots is not None:
            patches = [t * h * w for t, h, w in grids]
            unit = self.model.visual.merge**2
            vp.lora = {"patches": token_lora(slots, patches, merged_slot, dev),
                       "units": token_lora(slots, [n // unit for n in patches], merged_slot, dev)}
        return vp

    def run_vision(self, vp: VisionPass) -> torch.Tensor:
        return self.model.visual(vp)


def vision_input(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """An item's (patches, grid): an image's, or a video's (a grid of t temporal patches)."""
    if "video_grid_thw" in data:
        return data["pixel_values_videos"], data["video_grid_thw"]
    return data["pixel_values"], data["image_grid_thw"]


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size Qwen2-VL's processors resize to (transformers' `smart_resize`): both sides multiples of `factor`,
    the area within [min_pixels, max_pixels], the aspect ratio kept as closely as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image of {width}x{height} pixels: Qwen2-VL takes aspect ratios up to 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


# transformers' Qwen2VLVideoProcessor defaults, for settings a checkpoint's video config leaves out.
VIDEO_DEFAULTS = {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}, "resample": 3,
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


class Qwen2VLInputProcessor(ImagePromptProcessor):
    """Expands each `<|image_pad|>` and `<|video_pad|>` to its token count and computes M-RoPE positions, as the HF
    processor and `get_rope_index` do, with the checkpoint's own image (and video) processor settings. A video's
    frames are resized and normalised as its image processor would each of them (with the video settings), and
    cut into temporal patches of consecutive frames; Qwen2.5-VL also spaces them in time (`second_per_grid_ts`)."""

    video_token = "<|video_pad|>"

    def __init__(self, model_dir: str | Path, hf_config, tokenizer) -> None:
        super().__init__(model_dir, tokenizer, hf_config.image_token_id, hf_config.video_token_id)
        self.merge = hf_config.vision_config.spatial_merge_size
        c = self.config
        self.patch, self.temporal = c.patch_size, c.temporal_patch_size
        self.min_pixels, self.max_pixels = c.size.shortest_edge, c.size.longest_edge
        # Qwen2.5-VL's temporal positions advance `tokens_per_second` a second; Qwen2-VL's one per temporal patch.
        self.tokens_per_second = getattr(hf_config.vision_config, "tokens_per_second", None)
        video = VIDEO_DEFAULTS | video_settings(model_dir)
        size = dict(video["size"])
        size["shortest_edge"] = video.get("min_pixels", size.get("shortest_edge"))
        size["longest_edge"] = video.get("max_pixels", size.get("longest_edge"))
        self.video_pixels = (size["shortest_edge"], size["longest_edge"])
        self.video_resample = int(video["resample"])
        self.video_normalize = PixelNormalizer.build(video["do_rescale"], video["rescale_factor"],
                                                     video["do_normalize"], video["image_mean"], video["image_std"])
        self.video_hash_key = json.dumps([type(self).__name__, "video", video], sort_keys=True).encode()

    def image_pixels(self, image: Image.Image) -> torch.Tensor:
        if self.config.do_resize:
            h, w = smart_resize(image.height, image.width, self.patch * self.merge, self.min_pixels, self.max_pixels)
            image = resize(image, h, w, self.resample)
        return as_tensor(image)

    def pixel_tensors(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        patches, grid = self.patchify(pixels[None])
        return {**self.normalize.tensors("pixel_values", patches), "image_grid_thw": grid}

    def video_runs(self, video: Video) -> list[Run]:
        first = video.frames[0]
        h, w = smart_resize(first.height, first.width, self.patch * self.merge, *self.video_pixels)
        frames = torch.stack([as_tensor(resize(f, h, w, self.video_resample)) for f in video.frames])
        pixels, grid = self.patchify(frames)
        data = {**self.video_normalize.tensors("pixel_values_videos", pixels), "video_grid_thw": grid}
        key = self.video_hash_key
        if self.tokens_per_second is not None:  # what Qwen2_5_VLProcessor adds: seconds per temporal patch
            data["second_per_grid_ts"] = torch.tensor([self.temporal / video.fps], dtype=torch.float32)
            # It moves the video's positions, so it is part of what the prefix cache's block hashes must tell apart.
            key += data["second_per_grid_ts"].numpy().tobytes()
        tokens = int(grid.prod()) // self.merge**2
        return [Run(self.video_token_id, data, tokens, content_hash(key, frames))]

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, H, W, 3] uint8 frames -> ([t*h*w, 3*T*p*p] uint8 patches, [1, 3] grid (t, h, w)): the frames
        padded with copies of the last to a multiple of the temporal patch T (an image is T copies of itself),
        patches in merge-unit order (each merge x merge block of patches consecutive), a patch's values channel,
        then frame within the temporal patch, then row and column."""
        if pad := -frames.shape[0] % self.temporal:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        f, height, width, _ = frames.shape
        p, m, t = self.patch, self.merge, self.temporal
        gt, gh, gw = f // t, height // p, width // p
        x = frames.view(gt, t, gh // m, m, p, gw // m, m, p, 3).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return x.reshape(gt * gh * gw, -1), torch.tensor([[gt, gh, gw]])

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        return int(data["image_grid_thw"].prod()) // self.merge**2

    def positions(self, length: int, items: Sequence[ImageItem]) -> tuple[torch.Tensor, int]:
        """Text advances all three axes together; an image or video spans a (t, h, w) grid starting at the current
        position (a video's t axis spaced by `tokens_per_second` x its seconds per temporal patch on Qwen2.5-VL),
        and the text after it resumes past the grid's larger spatial extent, as transformers' `get_rope_index`
        does. Generated tokens continue past the largest position."""
        chunks, cur, idx = [], 0, 0
        for item in items:
            if item.offset > idx:
                n = item.offset - idx
                chunks.append(torch.arange(cur, cur + n).expand(3, -1))
                cur += n
            video = "video_grid_thw" in item.data
            t, h, w = item.data["video_grid_thw" if video else "image_grid_thw"].view(-1).tolist()
            h, w = h // self.merge, w // self.merge
            tt = torch.arange(t)
            if video and "second_per_grid_ts" in item.data:
                tt = (tt * (self.tokens_per_second * item.data["second_per_grid_ts"][0])).long()
            grid = torch.stack([tt.view(-1, 1, 1).expand(t, h, w), torch.arange(h).view(1, -1, 1).expand(t, h, w),
                                torch.arange(w).view(1, 1, -1).expand(t, h, w)])
            chunks.append(grid.reshape(3, -1) + cur)
            cur += max(h, w)
            idx = item.offset + item.num_tokens
        if length > idx:
            chunks.append(torch.arange(cur, cur + length - idx).expand(3, -1))
        positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        return positions, int(positions.max()) + 1 - length if length else 0
