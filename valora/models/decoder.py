"""The Llama/Qwen2-style decoder-only language model that every supported LMM family wraps.

Fused qkv and gate/up projections (one GEMM each), paged-KV attention, RoPE or M-RoPE. Module paths mirror the
Hugging Face ones (`layers.N.self_attn.*`, `layers.N.mlp.*`) so checkpoints and PEFT adapters map by name.

The residual stream flows vLLM-style: each layer returns (its MLP output, the residual before it), and the next
norm adds the two (`h, residual = norm(x, residual)`), so on CUDA every residual add is fused into a norm kernel
and a layer launches norm, qkv, rotary, attention, o, norm, gate/up, silu*mul, down (see layers/fused_kernels.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from valora.distributed.state import tp
from valora.errors import UserError
from valora.models.forward_batch import ForwardBatch
from valora.models.layers import fused_kernels
from valora.models.layers.attention import PagedAttention
from valora.models.layers.mlp import GatedMLP
from valora.models.layers.norm import RMSNorm
from valora.models.layers.parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, head_shard
from valora.models.layers.rotary import MRotaryEmbedding, Rope


@dataclass(frozen=True)
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, ...] | None
    qkv_bias: bool
    hidden_act: str = "silu"

    @staticmethod
    def from_hf(cfg, qkv_bias: bool | None = None) -> DecoderConfig:
        """`qkv_bias` defaults to the architecture's: Qwen2-style LMs have q/k/v biases, Llama and Mistral none."""
        qwen2 = str(getattr(cfg, "model_type", "")).startswith("qwen2")
        if not qwen2 and (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
            raise UserError("attention_bias / mlp_bias of Llama-style LMs are not supported")
        qkv_bias = qwen2 if qkv_bias is None else qkv_bias
        rope = dict(getattr(cfg, "rope_parameters", None) or {})
        legacy = getattr(cfg, "rope_scaling", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        section = rope.get("mrope_section", legacy.get("mrope_section"))
        rope_type = rope.get("rope_type", legacy.get("rope_type", legacy.get("type", "default")))
        if rope_type not in ("default", "mrope"):
            raise UserError(f"rope type {rope_type!r} is not supported yet (default and mrope are)")
        heads = cfg.num_attention_heads
        return DecoderConfig(
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=float(theta),
            mrope_section=tuple(section) if section else None,
            qkv_bias=qkv_bias,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
        )


class DecoderAttention(nn.Module):
    """Under tensor parallelism each rank computes its share of the query heads and the KV heads they read
    (a KV head shared by several ranks when there are fewer KV heads than ranks); o_proj sums the ranks' shares."""

    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        q_rows, kv_rows = head_shard(tp(), c.num_heads, c.head_dim), head_shard(tp(), c.num_kv_heads, c.head_dim)
        self.num_heads, self.num_kv_heads, self.head_dim = q_rows[1] // c.head_dim, kv_rows[1] // c.head_dim, c.head_dim
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.qkv_proj = ColumnParallelLinear(
            c.hidden_size, (q, kv, kv), bias=c.qkv_bias, lora_names=("q_proj", "k_proj", "v_proj"),
            shards=(q_rows, kv_rows, kv_rows),
        )
        self.o_proj = RowParallelLinear(q, c.hidden_size, shard=q_rows)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, c.head_dim)

    def forward(self, x, rope: Rope, kv_cache, batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x, batch.lora)
        q, k, v = qkv.split([self.num_heads * self.head_dim, *(2 * [self.num_kv_heads * self.head_dim])], dim=-1)
        q, k = rope(q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim))
        o = self.attn(q, k, v.view(t, self.num_kv_heads, self.head_dim), kv_cache, batch.attn)
        return self.o_proj(o.reshape(t, -1), batch.lora)


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DecoderAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = GatedMLP(c.hidden_size, c.intermediate_size, c.hidden_act, tensor_parallel=True)

    def forward(self, x, residual, rope: Rope, kv_cache, batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream before it); their sum is the layer's output. `residual` is None for the
        first layer, else the previous layer's second result (x is then its first)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, kv_cache, batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h, batch.lora), residual


class DecoderModel(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.config = c
        self.embed_tokens = VocabParallelEmbedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.rotary = MRotaryEmbedding(c.head_dim, c.rope_theta, c.mrope_section)

    def forward(self, embeds: torch.Tensor, kv_caches, batch: ForwardBatch) -> torch.Tensor:
        rope = self.rotary.for_step(batch.positions, embeds.dtype, fused=fused_kernels.use_triton(embeds))
        x, residual = embeds, None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv_cache, batch)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]
