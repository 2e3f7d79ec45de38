"""RMSNorm computed in float32, cast back before the weight (the order Qwen2/Llama use, so bf16 results match), and
LayerNorm (the vision towers').

With a `residual`, the residual add is fused in (vLLM-style flow): `norm(x, residual)` returns
`(norm(x + residual), x + residual)`, so a block's two adds ride on its two norms; `scale` multiplies x first
(`residual + scale * x`: InternViT's layer scale). On CUDA every form is one Triton kernel
(fused_kernels.rms_norm / layer_norm); elsewhere the PyTorch ops below, unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from valora.models.layers import fused_kernels


def _add(x: torch.Tensor, residual: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return residual + (x if scale is None else scale * x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused_kernels.use_triton(x):
            return fused_kernels.rms_norm(x, self.weight, self.eps, residual, scale)
        if residual is None:
            return self._norm(x)
        x = _add(x, residual, scale)
        return self._norm(x), x


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and checkpoint names) that also takes a residual, as RMSNorm does."""

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused_kernels.use_triton(x) and self.weight is not None and self.bias is not None:
            return fused_kernels.layer_norm(x, self.weight, self.bias, self.eps, residual, scale)
        if residual is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        x = _add(x, residual, scale)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps), x
