"""Attention over the paged KV cache (PyTorch path: runs everywhere, reads only each sequence's own slots).

New keys and values are written into the cache first; every query then attends over the slots its sequence
owns. Decodes (one query each) are batched into one padded SDPA call per layer; sequences with several new
tokens (prefill, recompute after preemption) each take one causal call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from valora.engine.forward_batch import AttentionMeta


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5

    def forward(
        self,
        q: torch.Tensor,  # [T, H, D]
        k: torch.Tensor,  # [T, KVH, D]
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],  # each [num_slots, KVH, D]
        meta: AttentionMeta,
    ) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        gqa = self.num_heads != self.num_kv_heads
        for span in meta.prefills:
            qs = q[span.q_start : span.q_start + span.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
            ks = k_cache.index_select(0, span.key_slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, Lk, D]
            vs = v_cache.index_select(0, span.key_slots).transpose(0, 1).unsqueeze(0)
            lk = ks.shape[2]
            if lk == span.q_len:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=gqa)
            else:  # queries are the last q_len positions of the context
                qpos = torch.arange(lk - span.q_len, lk, device=q.device)
                mask = torch.arange(lk, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[span.q_start : span.q_start + span.q_len] = o.squeeze(0).transpose(0, 1)
        if meta.decode_rows is not None:
            bd, lmax = meta.decode_slots.shape
            qd = q.index_select(0, meta.decode_rows).unsqueeze(2)  # [Bd, H, 1, D]
            flat = meta.decode_slots.reshape(-1)
            kd = k_cache.index_select(0, flat).view(bd, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vd = v_cache.index_select(0, flat).view(bd, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=gqa)
            out.index_copy_(0, meta.decode_rows, o.squeeze(2))
        return out
