"""Rotary position embeddings, including Qwen2-VL's multimodal M-RoPE (temporal, height, width sections) and the
2D RoPE of its vision tower (height and width sections).

`MRotaryEmbedding.for_step` (or `make_rope`) gives the step's `Rope`, which every attention layer calls on its q and
k. On the PyTorch path it holds the cos/sin tables computed once per step; on CUDA it holds the positions, and one
Triton kernel per layer (fused_kernels.rotary_qk) computes the angles inline and rotates q and k together.
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
    """One step's rotary inputs: `cos`/`sin` [T, D] (PyTorch path) or `positions` (fused kernel). `fp32`: rotate in
    float32 and round once (the vision towers), instead of in q's dtype with cos/sin cast to it (the LMs)."""

    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    axis: torch.Tensor | None = None
    fp32: bool = False

    def __call__(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, Hq, D], k [T, Hk, D] -> rotated q and k (new contiguous tensors)."""
        if self.cos is None:
            return fused_kernels.rotary_qk(q, k, self.positions, self.inv_freq, self.axis, self.fp32)
        if self.fp32:
            return (apply_rotary(q.float(), self.cos, self.sin).to(q.dtype),
                    apply_rotary(k.float(), self.cos, self.sin).to(k.dtype))
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin)


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [T, D] for positions [A, T] (or [T]): frequency i takes its angle from axis `axis[i]`."""
    freqs = positions.reshape(-1, positions.shape[-1]).float().unsqueeze(-1) * inv_freq  # [A, T, half]
    if freqs.shape[0] > 1:
        freqs = freqs.gather(0, axis.view(1, 1, -1).expand(1, freqs.shape[1], -1))
    emb = torch.cat((freqs[0], freqs[0]), dim=-1)
    return emb.cos(), emb.sin()


def make_rope(positions: torch.Tensor, inv_freq: torch.Tensor, axis: torch.Tensor, *, fused: bool,
              dtype: torch.dtype = torch.float32, fp32: bool = False) -> Rope:
    """The `Rope` of positions [A, T]: the positions themselves for the fused kernel, or the cos/sin tables (in
    float32 with `fp32`, else cast to `dtype`)."""
    if fused:
        return Rope(positions=positions, inv_freq=inv_freq, axis=axis, fp32=fp32)
    cos, sin = rope_tables(positions, inv_freq, axis)
    return Rope(cos=cos, sin=sin, fp32=fp32) if fp32 else Rope(cos=cos.to(dtype), sin=sin.to(dtype))


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
        cos, sin = rope_tables(positions, self.inv_freq, self.axis)
        return cos.to(dtype), sin.to(dtype)

    def for_step(self, positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> Rope:
        """The step's `Rope`: positions for the fused kernel, or the cos/sin tables in `dtype`."""
        # plain RoPE takes row 0 of [A, T] positions (the PyTorch path's gather with axis 0 does the same)
        return make_rope(positions, self.inv_freq, self.axis, fused=fused, dtype=dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
