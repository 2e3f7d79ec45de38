"""The two feed-forward shapes every family uses, each projection a LoRALinear: a plain two-layer MLP (ViTs,
projectors) and the gated SwiGLU-style MLP (Llama/Qwen2 LMs, Qwen2.5-VL's ViT) with gate and up fused."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from valora.lora.batch import LoRABatch
from valora.models.layers.linear import LoRALinear


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.fc2 = LoRALinear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x, lora)), lora)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one GEMM whose slices carry PEFT's gate_proj/up_proj names."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up_proj = LoRALinear(dim, (hidden, hidden), bias=bias, lora_names=("gate_proj", "up_proj"))
        self.act = ACT2FN[act]
        self.down_proj = LoRALinear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).split(self.hidden, dim=-1)
        return self.down_proj(self.act(gate) * up, lora)
