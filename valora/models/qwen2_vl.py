"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): ViT with 2D RoPE and a 2x2 patch merger, Qwen2 LM with M-RoPE.

One file per family: the vision tower, how its tokens enter the language model, its checkpoint names, and its
prompt preprocessing (placeholder expansion and 3D positions) live here. Qwen2.5-VL reuses it with its own
vision blocks and attention windows (qwen2_5_vl.py).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from valora.lora.ops.batch import LoRABatch
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.layers.linear import LoRALinear
from valora.models.layers.mlp import MLP
from valora.models.layers.rotary import rotate_half
from valora.models.loader import WeightMapper
from valora.models.processing import ImagePromptProcessor
from valora.models.vlm import FUSED_PROJECTIONS, VisionLanguageModel, token_lora
from valora.multimodal.inputs import ImageItem, InputError
from valora.multimodal.pixels import as_tensor, resize

# Hub checkpoints predate transformers v5 and keep the LM at `model.*` and the ViT at `visual.*`.
MAPPER = WeightMapper(
    renames=((r"^visual\.", "model.visual."), (r"^model\.(?!visual\.|language_model\.)", "model.language_model.")),
    packed=FUSED_PROJECTIONS,
    ignore=(r"rotary_emb\.inv_freq$",),
)


def _apply_rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos.unsqueeze(1) + rotate_half(xf) * sin.unsqueeze(1)).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = LoRALinear(dim, 3 * dim, bias=True)
        self.proj = LoRALinear(dim, dim, bias=True)

    def forward(self, x, cos, sin, seqlens: Sequence[int], lora: LoRABatch | None) -> torch.Tensor:
        """Attention within each span of `seqlens` rows; consecutive spans of one length (frames of equal size,
        Qwen2.5-VL's full windows) go through one batched call."""
        s = x.shape[0]
        q, k, v = self.qkv(x, lora).view(s, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _apply_rotary_fp32(q, cos, sin), _apply_rotary_fp32(k, cos, sin)
        outs, start = [], 0
        for length, group in itertools.groupby(seqlens):
            n = len(list(group))
            qs, ks, vs = (t[start : start + n * length].view(n, length, self.num_heads, -1).transpose(1, 2)
                          for t in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(n * length, -1))
            start += n * length
        return self.proj(torch.cat(outs), lora)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp: nn.Module, norm: type[nn.Module]) -> None:
        super().__init__()
        self.norm1 = norm(dim, eps=1e-6)
        self.norm2 = norm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = mlp

    def forward(self, x, cos, sin, seqlens, lora):
        x = x + self.attn(self.norm1(x), cos, sin, seqlens, lora)
        return x + self.mlp(self.norm2(x), lora)


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = norm(dim, eps=1e-6)
        self.mlp = nn.ModuleList([LoRALinear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                  LoRALinear(self.hidden, out_dim, bias=True)])

    def forward(self, x, lora):
        x = self.ln_q(x).view(-1, self.hidden)
        return self.mlp[2](self.mlp[1](self.mlp[0](x, lora)), lora)


class Qwen2VisionTower(nn.Module):
    """Qwen2-VL's ViT over packed patches of any number of images. Subclasses choose the block (`make_block`), the
    norm, the widths (`from_config`) and which patches attend to which (`layout`)."""

    norm: ClassVar[type[nn.Module]] = nn.LayerNorm

    def __init__(self, vc, width: int, out_dim: int) -> None:
        super().__init__()
        self.merge, self.width = vc.spatial_merge_size, width
        # The patch embedding is a Conv3d whose stride equals its kernel: a linear map of each flattened patch.
        self.patch_embed = nn.Module()
        self.patch_embed.proj = LoRALinear(vc.in_channels * vc.temporal_patch_size * vc.patch_size**2, width)
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        quarter = width // vc.num_heads // 2
        self.register_buffer(
            "inv_freq", 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter)), persistent=False
        )
        self.blocks = nn.ModuleList([self.make_block(vc) for _ in range(vc.depth)])
        self.merger = PatchMerger(out_dim, width, vc.spatial_merge_size, self.norm)

    @classmethod
    def from_config(cls, vc) -> Qwen2VisionTower:
        return cls(vc, vc.embed_dim, vc.hidden_size)

    def make_block(self, vc) -> nn.Module:
        return VisionBlock(self.width, vc.num_heads, MLP(self.width, int(self.width * vc.mlp_ratio), vc.hidden_act),
                           self.norm)

    def layout(self, grids: Sequence[Sequence[int]]) -> tuple[torch.Tensor | None, list[list[int]]]:
        """The order of merge units (groups of merge^2 patches) through the blocks (None: as given) and each
        block's attention spans in patches; Qwen2-VL attends within each image frame."""
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        return None, [seqlens] * len(self.blocks)

    def _rotary(self, grids: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = []
        m = self.merge
        for t, h, w in grids:
            hp = torch.arange(h, device=device).view(h // m, m, 1, 1).expand(-1, -1, w // m, m)
            wp = torch.arange(w, device=device).view(1, 1, w // m, m).expand(h // m, m, -1, -1)
            hw = torch.stack([hp.transpose(1, 2).reshape(-1), wp.transpose(1, 2).reshape(-1)], dim=-1)
            pos.append(hw.repeat(t, 1))
        freqs = torch.cat(pos).float().unsqueeze(-1) * self.inv_freq  # [P, 2, quarter/2]
        freqs = freqs.flatten(1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Sequence[int]], slots: Sequence[int],
                merged_slot: int | None = None) -> torch.Tensor:
        patches = [t * h * w for t, h, w in grids]
        dev = pixel_values.device
        unit = self.merge**2
        # Reordering keeps every patch inside its own image's rows, so the per-row adapter slots hold either way.
        lora = token_lora(slots, patches, merged_slot, dev)
        merged_lora = token_lora(slots, [n // unit for n in patches], merged_slot, dev)
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype), lora)
        cos, sin = self._rotary(grids, x.device)
        order, spans = self.layout(grids)
        if order is not None:
            rows = (order.to(dev)[:, None] * unit + torch.arange(unit, device=dev)).view(-1)
            x, cos, sin = x[rows], cos[rows], sin[rows]
        for blk, seqlens in zip(self.blocks, spans):
            x = blk(x, cos, sin, seqlens, lora)
        x = self.merger(x, merged_lora)
        return x if order is None else x[torch.argsort(order.to(dev))]


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

    def embed_images(self, data, slots, merged_slot) -> torch.Tensor:
        pv = torch.cat([d["pixel_values"] for d in data]).to(self.lm_head.weight.device)
        grids = [d["image_grid_thw"].view(-1).tolist() for d in data]
        return self.model.visual(pv, grids, slots, merged_slot)


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


class Qwen2VLInputProcessor(ImagePromptProcessor):
    """Expands each `<|image_pad|>` to its image's token count and computes M-RoPE positions, as the HF
    processor and `get_rope_index` do, with the checkpoint's own image processor settings."""

    def __init__(self, model_dir: str | Path, hf_config, tokenizer) -> None:
        super().__init__(model_dir, tokenizer, hf_config.image_token_id)
        self.merge = hf_config.vision_config.spatial_merge_size
        c = self.config
        self.patch, self.temporal = c.patch_size, c.temporal_patch_size
        self.min_pixels, self.max_pixels = c.size.shortest_edge, c.size.longest_edge

    def image_tensors(self, image: Image.Image) -> dict[str, torch.Tensor]:
        if self.config.do_resize:
            h, w = smart_resize(image.height, image.width, self.patch * self.merge, self.min_pixels, self.max_pixels)
            image = resize(image, h, w, self.resample)
        pixels, grid = self.patchify(as_tensor(image)[None])
        return {"pixel_values": pixels, "image_grid_thw": grid}

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[F, H, W, 3] uint8 frames -> ([t*h*w, 3*T*p*p] float32 patches, [1, 3] grid (t, h, w)): the frames
        padded with copies of the last to a multiple of the temporal patch T (an image is T copies of itself),
        patches in merge-unit order (each merge x merge block of patches consecutive), a patch's values channel,
        then frame within the temporal patch, then row and column."""
        if pad := -frames.shape[0] % self.temporal:
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        f, height, width, _ = frames.shape
        p, m, t = self.patch, self.merge, self.temporal
        gt, gh, gw = f // t, height // p, width // p
        x = frames.view(gt, t, gh // m, m, p, gw // m, m, p, 3).permute(0, 2, 5, 3, 6, 8, 1, 4, 7)
        return self.normalize(x, channel_dim=5).view(gt * gh * gw, -1), torch.tensor([[gt, gh, gw]])

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        return int(data["image_grid_thw"].prod()) // self.merge**2

    def positions(self, length: int, items: Sequence[ImageItem]) -> tuple[torch.Tensor, int]:
        """Text advances all three axes together; an image spans a (t, h, w) grid starting at the current
        position, and the text after it resumes past the grid's largest extent."""
        chunks, cur, idx = [], 0, 0
        for item in items:
            if item.offset > idx:
                n = item.offset - idx
                chunks.append(torch.arange(cur, cur + n).expand(3, -1))
                cur += n
            t, h, w = item.data["image_grid_thw"].view(-1).tolist()
            h, w = h // self.merge, w // self.merge
            tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w)
            hh = torch.arange(h).view(1, -1, 1).expand(t, h, w)
            ww = torch.arange(w).view(1, 1, -1).expand(t, h, w)
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w)  # as transformers' get_rope_index does (t is 1 for images)
            idx = item.offset + item.num_tokens
        if length > idx:
            chunks.append(torch.arange(cur, cur + length - idx).expand(3, -1))
            cur += length - idx
        positions = torch.cat(chunks, dim=1) if chunks else torch.zeros(3, 0, dtype=torch.long)
        return positions, cur - length
