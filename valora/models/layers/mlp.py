"""The two feed-forward shapes every family uses, each projection a LoRALinear: a plain two-layer MLP (ViTs,
projectors) and the gated SwiGLU-style MLP (Llama/Qwen2 LMs, Qwen2.5-VL's ViT) with gate and up fused."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from valora.lora.ops.batch import LoRABatch
from valora.models.layers import fused_kernels, gemm_kernels
from valora.models.layers.linear import LoRALinear
from valora.models.layers.parallel import ColumnParallelLinear, RowParallelLinear

# activations whose act(gate) * up has a fused kernel (fused_kernels.silu_and_mul)
_FUSED_ACTS = ("silu", "swish")


class MLP(nn.Module):
    """fc2(act(fc1(x))). quick_gelu (three ops in ACT2FN) is one Triton kernel on CUDA; PyTorch's GELU is one op
    already. The biases ride in the GEMMs (F.linear on 2D input is one addmm). With VALORA_GEMM_EPILOGUE=1, large
    passes without adapter work compute act(fc1(x)) in one Triton GEMM (layers/gemm_kernels.py)."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = LoRALinear(dim, hidden, bias=bias)
        self.act = ACT2FN[act]
        self.fused_act = act == "quick_gelu"
        self.epilogue_act = act if act in ("quick_gelu", "gelu") else None
        self.fc2 = LoRALinear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        if self.epilogue_act is not None and lora is None and gemm_kernels.use_gemm_act(x):
            h = gemm_kernels.linear_act(x, self.fc1.active_weight, self.fc1.bias, self.epilogue_act)
            return self.fc2(h, lora)
        h = self.fc1(x, lora)
        h = fused_kernels.quick_gelu(h) if self.fused_act and fused_kernels.use_triton(h) else self.act(h)
        return self.fc2(h, lora)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); gate and up are one GEMM whose slices carry PEFT's gate_proj/up_proj names.
    `tensor_parallel` (the language model's) splits the hidden units over the ranks: gate/up column-parallel, down
    row-parallel.

    With SiLU on CUDA, act(gate) * up is one Triton kernel (or, with VALORA_GEMM_EPILOGUE=1 on large passes without
    adapter work, the epilogue of the gate/up GEMM); other activations and devices use ACT2FN."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool = False, tensor_parallel: bool = False) -> None:
        super().__init__()
        names = ("gate_proj", "up_proj")
        if tensor_parallel:
            self.gate_up_proj = ColumnParallelLinear(dim, (hidden, hidden), bias=bias, lora_names=names)
            self.down_proj = RowParallelLinear(hidden, dim, bias=bias)
            self.hidden = self.down_proj.in_features
        else:
            self.gate_up_proj = LoRALinear(dim, (hidden, hidden), bias=bias, lora_names=names)
            self.down_proj = LoRALinear(hidden, dim, bias=bias)
            self.hidden = hidden
        self.act = ACT2FN[act]
        self.fused_act = act in _FUSED_ACTS

    def forward(self, x: torch.Tensor, lora: LoRABatch | None) -> torch.Tensor:
        if self.fused_act and lora is None and gemm_kernels.use_gemm_act(x):
            p = self.gate_up_proj
            return self.down_proj(gemm_kernels.linear_act(x, p.active_weight, p.bias, "silu_and_mul"), lora)
        gate_up = self.gate_up_proj(x, lora)
        if self.fused_act and fused_kernels.use_triton(gate_up):
            h = fused_kernels.silu_and_mul(gate_up)
        else:
            gate, up = gate_up.split(self.hidden, dim=-1)
            h = self.act(gate) * up
        return self.down_proj(h, lora)
