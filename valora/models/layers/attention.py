"""Attention over the paged KV cache, reading only the blocks each sequence owns.

New keys and values are written into the cache first (`index_copy_` on the slot mapping); every query then
attends over its sequence's context through the block table. Two backends share one `AttentionMeta`:

- "triton" (CUDA): `attention_kernels.paged_prefill_attention` for sequences with several new tokens and
  `paged_decode_attention` (split-KV) for single-token decodes; no host sync, graph-capturable for decodes.
- "torch" (everywhere): gathers each sequence's slots from its block table and runs SDPA (one causal call per
  prefill, one padded call for all decodes).

`backend=None` picks Triton on CUDA when it imports, else PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMeta:
    """Where each new token's K/V goes and which cached keys every query reads, in block-table form.

    Device tensors feed the kernels (and can be copied into static CUDA-graph buffers); the host ints are what the
    PyTorch path and the kernel launch grids need. A sequence's key i sits in KV slot
    `block_table[i // block_size] * block_size + i % block_size`; table rows are padded with block 0.
    """

    slot_mapping: torch.Tensor  # [T] int64: KV slot of each new token (pad rows: any slot the runner reserves)
    block_size: int
    # Sequences with several new tokens (prefill, recompute after preemption, chunks): queries are batch rows
    # [q_start, q_start + q_len) and sit at the LAST q_len positions of a context of context_len keys.
    prefill_q_starts: torch.Tensor | None = None  # [Sp] int32
    prefill_q_lens: torch.Tensor | None = None  # [Sp] int32
    prefill_context_lens: torch.Tensor | None = None  # [Sp] int32
    prefill_block_tables: torch.Tensor | None = None  # [Sp, max_blocks] int32
    prefill_host: tuple[tuple[int, int, int], ...] = ()  # (q_start, q_len, context_len) per prefill
    prefill_max_q_len: int = 0  # host: at least the longest q_len (sizes the Triton grid; a graph's token bucket)
    # Single-token decodes.
    decode_rows: torch.Tensor | None = None  # [Bd] int64 rows of the batch
    decode_context_lens: torch.Tensor | None = None  # [Bd] int32 (0: padding row, its output is 0)
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32
    decode_max_context: int = 0  # host: the longest decode context


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None,
                 backend: str | None = None) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if backend not in (None, "triton", "torch"):
            raise ValueError(f"backend must be 'triton', 'torch' or None, not {backend!r}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        self.backend = backend  # None: Triton on CUDA, PyTorch elsewhere

    def _use_triton(self, q: torch.Tensor) -> bool:
        if self.backend is not None:
            return self.backend == "triton"
        return q.is_cuda and _triton_available()

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
        if self._use_triton(q):
            self._forward_triton(q, k_cache, v_cache, meta, out)
        else:
            self._forward_torch(q, k_cache, v_cache, meta, out)
        return out

    def _forward_triton(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                        out: torch.Tensor) -> None:
        from valora.models.layers.attention_kernels import paged_decode_attention, paged_prefill_attention

        if meta.prefill_q_starts is not None:
            paged_prefill_attention(q, k_cache, v_cache, meta.prefill_block_tables, meta.prefill_q_starts,
                                    meta.prefill_q_lens, meta.prefill_context_lens, meta.block_size, self.scale,
                                    out, meta.prefill_max_q_len)
        if meta.decode_rows is not None:
            paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                                   meta.block_size, self.scale, out, rows=meta.decode_rows)

    def _forward_torch(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMeta,
                       out: torch.Tensor) -> None:
        bs = meta.block_size
        gqa = self.num_heads != self.num_kv_heads
        in_block = torch.arange(bs, device=q.device)
        for j, (q_start, q_len, ctx) in enumerate(meta.prefill_host):
            blocks = meta.prefill_block_tables[j, : -(-ctx // bs)].long()
            slots = (blocks[:, None] * bs + in_block).reshape(-1)[:ctx]
            qs = q[q_start : q_start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, Lq, D]
            ks = k_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)  # [1, KVH, Lk, D]
            vs = v_cache.index_select(0, slots).transpose(0, 1).unsqueeze(0)
            if ctx == q_len:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=gqa)
            else:  # queries are the last q_len positions of the context
                qpos = torch.arange(ctx - q_len, ctx, device=q.device)
                mask = torch.arange(ctx, device=q.device)[None, :] <= qpos[:, None]
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=self.scale, enable_gqa=gqa)
            out[q_start : q_start + q_len] = o.squeeze(0).transpose(0, 1)
        if meta.decode_rows is not None:
            lmax = max(meta.decode_max_context, 1)
            nb = -(-lmax // bs)
            tables = meta.decode_block_tables[:, :nb].long()
            bd = tables.shape[0]
            slots = (tables[:, :, None] * bs + in_block).reshape(bd, -1)[:, :lmax]  # [Bd, Lmax]
            lens = meta.decode_context_lens.long()
            mask = torch.arange(lmax, device=q.device)[None, :] < lens[:, None]
            mask[:, 0] = True  # a padding row (context 0) reads one key, and its output is zeroed below
            qd = q.index_select(0, meta.decode_rows).unsqueeze(2)  # [Bd, H, 1, D]
            flat = slots.reshape(-1)
            kd = k_cache.index_select(0, flat).view(bd, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
            vd = v_cache.index_select(0, flat).view(bd, lmax, self.num_kv_heads, self.head_dim).transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask[:, None, None, :], scale=self.scale,
                                               enable_gqa=gqa).squeeze(2)
            o = o.masked_fill((lens == 0)[:, None, None], 0.0)
            out.index_copy_(0, meta.decode_rows, o)
