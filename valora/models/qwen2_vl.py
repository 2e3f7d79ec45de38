"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): ViT with 2D RoPE and a 2x2 patch merger, Qwen2 LM with M-RoPE.

One file per family: the vision tower, how its tokens enter the language model, its checkpoint names, and its
prompt preprocessing (placeholder expansion and 3D positions) live here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from valora.engine.forward_batch import ForwardBatch, ImageInputs
from valora.lora.ops import LoRAMeta
from valora.models.decoder import DecoderConfig, DecoderModel
from valora.models.layers.linear import LoRALinear
from valora.models.layers.rotary import rotate_half
from valora.models.loader import WeightMapper, load_weights
from valora.multimodal.inputs import ImageItem, InputError, ProcessedPrompt, tensor_hash

# Hub checkpoints predate transformers v5 and keep the LM at `model.*` and the ViT at `visual.*`.
MAPPER = WeightMapper(
    renames=((r"^visual\.", "model.visual."), (r"^model\.(?!visual\.|language_model\.)", "model.language_model.")),
    packed={"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
            "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)},
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

    def forward(self, x, cos, sin, seqlens: Sequence[int], lora: LoRAMeta | None) -> torch.Tensor:
        s = x.shape[0]
        q, k, v = self.qkv(x, lora).view(s, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _apply_rotary_fp32(q, cos, sin), _apply_rotary_fp32(k, cos, sin)
        outs = []
        for qs, ks, vs in zip(q.split(seqlens), k.split(seqlens), v.split(seqlens)):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1), ks.transpose(0, 1), vs.transpose(0, 1))
            outs.append(o.transpose(0, 1))
        return self.proj(torch.cat(outs).reshape(s, -1), lora)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str) -> None:
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden, bias=True)
        self.act = ACT2FN[act]
        self.fc2 = LoRALinear(hidden, dim, bias=True)

    def forward(self, x, lora):
        return self.fc2(self.act(self.fc1(x, lora)), lora)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, act: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, act)

    def forward(self, x, cos, sin, seqlens, lora):
        x = x + self.attn(self.norm1(x), cos, sin, seqlens, lora)
        return x + self.mlp(self.norm2(x), lora)


class PatchMerger(nn.Module):
    def __init__(self, out_dim: int, dim: int, merge: int) -> None:
        super().__init__()
        self.hidden = dim * merge * merge
        self.ln_q = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.ModuleList([LoRALinear(self.hidden, self.hidden, bias=True), nn.GELU(),
                                  LoRALinear(self.hidden, out_dim, bias=True)])

    def forward(self, x, lora):
        x = self.ln_q(x).view(-1, self.hidden)
        return self.mlp[2](self.mlp[1](self.mlp[0](x, lora)), lora)


class Qwen2VisionTower(nn.Module):
    def __init__(self, vc) -> None:
        super().__init__()
        self.merge = vc.spatial_merge_size
        self.embed_dim = vc.embed_dim
        # The patch embedding is a Conv3d whose stride equals its kernel: a linear map of each flattened patch.
        self.patch_embed = nn.Module()
        patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        self.patch_embed.proj = LoRALinear(patch, vc.embed_dim)
        head_dim = vc.embed_dim // vc.num_heads
        theta = (getattr(vc, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        quarter = head_dim // 2
        self.register_buffer(
            "inv_freq", 1.0 / (theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter)), persistent=False
        )
        hidden = int(vc.embed_dim * vc.mlp_ratio)
        self.blocks = nn.ModuleList(
            [VisionBlock(vc.embed_dim, vc.num_heads, hidden, vc.hidden_act) for _ in range(vc.depth)]
        )
        self.merger = PatchMerger(vc.hidden_size, vc.embed_dim, vc.spatial_merge_size)
        for p in self.parameters():
            p.requires_grad_(False)

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

    def forward(self, pixel_values: torch.Tensor, grids: Sequence[Sequence[int]], slots: Sequence[int]) -> torch.Tensor:
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        patches = [t * h * w for t, h, w in grids]
        lora = merged_lora = None
        if any(s >= 0 for s in slots):
            lora = LoRAMeta.build([s for s, n in zip(slots, patches) for _ in range(n)], pixel_values.device)
            merged = [s for s, n in zip(slots, patches) for _ in range(n // self.merge**2)]
            merged_lora = LoRAMeta.build(merged, pixel_values.device)
        x = self.patch_embed.proj(pixel_values.to(self.patch_embed.proj.weight.dtype), lora)
        cos, sin = self._rotary(grids, x.device)
        for blk in self.blocks:
            x = blk(x, cos, sin, seqlens, lora)
        return self.merger(x, merged_lora)


class Qwen2VLModel(nn.Module):
    def __init__(self, hf_config) -> None:
        super().__init__()
        self.visual = Qwen2VisionTower(hf_config.vision_config)
        self.language_model = DecoderModel(DecoderConfig.from_hf(hf_config.text_config, qkv_bias=True))


class Qwen2VLForConditionalGeneration(nn.Module):
    mapper = MAPPER

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.hf_config = hf_config
        tc = hf_config.text_config
        self.model = Qwen2VLModel(hf_config)
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False) or
                                        getattr(tc, "tie_word_embeddings", False))

    @property
    def decoder_config(self) -> DecoderConfig:
        return self.model.language_model.config

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        tied = {"lm_head.weight": "model.language_model.embed_tokens.weight"} if self.tie_word_embeddings else None
        load_weights(self, iter(weights), self.mapper, tied)

    def encode_images(self, images: ImageInputs) -> torch.Tensor:
        """Embeddings for this step's images, [sum num_tokens, hidden], batched through one ViT pass."""
        todo = [i for i, c in enumerate(images.cached) if c is None]
        fresh: dict[int, torch.Tensor] = {}
        if todo:
            dev = self.lm_head.weight.device
            pv = torch.cat([images.data[i]["pixel_values"] for i in todo]).to(dev)
            grids = [images.data[i]["image_grid_thw"].view(-1).tolist() for i in todo]
            out = self.model.visual(pv, grids, [images.lora_slots[i] for i in todo])
            fresh = dict(zip(todo, out.split([images.num_tokens[i] for i in todo])))
        embeds = [fresh[i] if c is None else c for i, c in enumerate(images.cached)]
        for i in todo:
            images.cached[i] = fresh[i]
        return torch.cat(embeds)

    def forward(self, batch: ForwardBatch, kv_caches) -> torch.Tensor:
        lm = self.model.language_model
        x = lm.embed_tokens(batch.input_ids)
        if batch.images is not None:
            x = x.index_copy(0, batch.images.token_rows, self.encode_images(batch.images).to(x.dtype))
        return lm(x, kv_caches, batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


class Qwen2VLInputProcessor:
    """Expands each `<|image_pad|>` to its image's token count and computes M-RoPE positions, as the HF
    processor and `get_rope_index` do, with the checkpoint's own image processor."""

    def __init__(self, model_dir: str | Path, hf_config, tokenizer) -> None:
        from transformers import AutoImageProcessor

        self.tokenizer = tokenizer
        self.image_processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = hf_config.image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge = hf_config.vision_config.spatial_merge_size

    def _images(self, images: Sequence) -> list[dict[str, torch.Tensor]]:
        if not images:
            return []
        out = self.image_processor(images=list(images), return_tensors="pt")
        grids = out["image_grid_thw"]
        chunks = out["pixel_values"].split((grids.prod(-1)).tolist())
        return [{"pixel_values": pv, "image_grid_thw": g.view(1, 3)} for pv, g in zip(chunks, grids)]

    def __call__(self, prompt: str | Sequence[int], images: Sequence) -> ProcessedPrompt:
        data = self._images(images)
        counts = [int(d["image_grid_thw"].prod()) // self.merge**2 for d in data]
        if isinstance(prompt, str):
            n = prompt.count(self.image_token)
            if n != len(data):
                raise InputError(f"prompt has {n} image placeholders ({self.image_token}) but {len(data)} images")
            parts = prompt.split(self.image_token)
            text = parts[0] + "".join(self.image_token * c + p for c, p in zip(counts, parts[1:]))
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self._expand_ids(list(prompt), counts)
        items, pos = [], 0
        for d, c in zip(data, counts):
            pos = ids.index(self.image_token_id, pos)
            items.append(ImageItem(d, c, pos, tensor_hash(d["pixel_values"], d["image_grid_thw"])))
            pos += c
        positions, delta = self.mrope_positions(len(ids), items)
        return ProcessedPrompt(ids, items, positions, delta)

    def _expand_ids(self, ids: list[int], counts: list[int]) -> list[int]:
        runs, out, i = 0, [], 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                out.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == self.image_token_id:
                j += 1
            if runs >= len(counts):
                raise InputError("prompt has more image placeholders than images")
            if j - i not in (1, counts[runs]):
                raise InputError(f"image {runs} needs 1 or {counts[runs]} placeholder tokens, got {j - i}")
            out.extend([self.image_token_id] * counts[runs])
            runs, i = runs + 1, j
        if runs != len(counts):
            raise InputError(f"prompt has {runs} image placeholders but {len(counts)} images")
        return out

    def mrope_positions(self, length: int, items: Sequence[ImageItem]) -> tuple[torch.Tensor, int]:
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
