"""Attention and patch embedding of ViT-style vision towers that see each image (or tile) as one fixed-length
sequence.

Activations stay flat ([images * seq, dim]) so every projection is one LoRALinear call with per-token adapter
slots; only attention reshapes to [images, heads, seq, head_dim]. The patch embedding is a convolution whose
stride equals its kernel, i.e. a linear map of each flattened patch, so it takes LoRA like any other layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from valora.lora.ops.batch import LoRABatch
from valora.models.layers.linear import LoRALinear
from valora.models.layers.norm import RMSNorm


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H/p) * (W/p), C * p * p], patches row-major and each flattened as a conv kernel is
    (channel, row, column), so a Conv2d weight flattened with `flatten(1)` applies to it as a linear map."""
    b, c, h, w = pixel_values.shape
    if h % patch or w % patch:
        raise ValueError(f"image of {h}x{w} pixels is not a whole number of {patch}-pixel patches")
    x = pixel_values.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * (h // patch) * (w // patch), c * patch * patch)


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention with q/k/v fused into one LoRA layer (PEFT names q/k/v_proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv_proj = LoRALinear(dim, (dim, dim, dim), bias=qkv_bias, lora_names=("q_proj", "k_proj", "v_proj"))
        self.out_proj = LoRALinear(dim, dim, bias=True)
        # InternViT-6B normalises q and k over the whole width before splitting heads.
        self.q_norm = RMSNorm(dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, x: torch.Tensor, num_seqs: int, lora: LoRABatch | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x, lora).split(self.dim, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(num_seqs, -1, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(o.transpose(1, 2).reshape(x.shape[0], self.dim), lora)
