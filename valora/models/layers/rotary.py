"""Rotary position embeddings, including Qwen2-VL's multimodal M-RoPE (temporal, height, width sections).

`MRotaryEmbedding.for_step` gives the step's `Rope`, which every attention layer calls on its q and k. On the
PyTorch path it holds the cos/sin tables computed once per step; on CUDA it holds the positions, and one Triton
kernel per layer (fused_kernels.rotary_qk) computes the angles inline and rotates q and k together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from valora.models.layers import fused_kernels


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class Rope:
    """One step's rotary inputs: `cos`/`sin` [T, D] (PyTorch path) or `positions` (fused kernel)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    axis: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] -> rotated q and k (new contiguous tensors)."""
        if self.cos is not None:
            return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)
        return fused_kernels.rotary_qk(q, k, self.positions, self.inv_freq, self.axis)


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

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> Rope:
        """The step's `Rope`: positions for the fused kernel, or the cos/sin tables in `dtype`."""
        if fused:
            # plain RoPE takes row 0 of [A, T] positions (the PyTorch path's gather with axis 0 does the same)
            return Rope(positions=positions, inv_freq=self.inv_freq, axis=self.axis)
        cos, sin = self(positions, dtype)
        return Rope(cos=cos, sin=sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
