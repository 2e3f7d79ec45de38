"""RMSNorm computed in float32, cast back before the weight (the order Qwen2/Llama use, so bf16 results match).

With a `residual`, the residual add is fused in (vLLM-style flow): `norm(x, residual)` returns
`(norm(x + residual), x + residual)`, so a decoder layer's two adds ride on its two norms. On CUDA both forms
are one Triton kernel (fused_kernels.rms_norm); elsewhere the PyTorch ops below, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from valora.models.layers import fused_kernels


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
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused_kernels.use_triton(x):
            return fused_kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
