"""Rotary position embeddings, including Qwen2-VL's multimodal M-RoPE (temporal, height, width sections)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MRotaryEmbedding(nn.Module):
    """cos/sin for positions [3, T] (M-RoPE) or [T] (plain RoPE, all three axes equal).

    Frequency i of the rotary half-dimension takes its angle from axis k when i falls in `sections[k]`;
    with `sections=None` every frequency uses the single position axis.
    """

    def __init__(self, head_dim: int, theta: float, sections: Sequence[int] | None = None) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        half = head_dim // 2
        if sections is not None and sum(sections) != half:
            raise ValueError(f"mrope_section {list(sections)} must add up to head_dim/2 = {half}")
        axis = torch.zeros(half, dtype=torch.long)
        if sections is not None:
            axis = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(list(sections)))
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            positions = positions.unsqueeze(0)
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [A, T, half]
        if freqs.shape[0] > 1:
            freqs = freqs.gather(0, self.axis.view(1, 1, -1).expand(1, freqs.shape[1], -1)).squeeze(0)
        else:
            freqs = freqs.squeeze(0)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
