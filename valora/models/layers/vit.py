"""What the vision towers share: variable-length bidirectional attention over packed rows, the attention of
CLIP-style ViTs, and the patch embedding.

A tower runs every new image of a step in one pass: the rows of all images (patches, plus a CLS row where the
tower has one) are packed into one [rows, dim] tensor, so every projection is one LoRALinear call with per-row
adapter slots, and attention is restricted to *spans* of consecutive rows (an image, a video frame, a Qwen2.5-VL
window). `VisionSpans` says which, once per pass and layout, in the form the chosen kernel reads:

    TORCH_SDPA      PyTorch SDPA, one batched call per run of equal-length spans (the CPU path)
    TRITON_ATTN     attention_kernels.varlen_attention: one launch, a host-cut table of query tiles
    FLASH_ATTN      torch.nn.attention.varlen (FlashAttention-2 varlen, CUDA, fp16/bf16): one launch, cu_seqlens
    FLEX_ATTENTION  torch's FlexAttention (compiled) with a document mask

(vLLM's names for its encoder attention backends.) TRITON_ATTN and FLASH_ATTN read only device tensors whose
sizes a CUDA graph can fix: `VisionSpans.build(..., num_spans=, max_len=)` pads them (empty spans, unused tiles).

The patch embedding is a convolution whose stride equals its kernel, i.e. a linear map of each flattened patch, so
it takes LoRA like any other layer.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from valora.config import MM_ENCODER_ATTN_BACKENDS
from valora.lora.ops.batch import LoRABatch
from valora.models.layers import fused_kernels
from valora.models.layers.linear import LoRALinear
from valora.models.layers.norm import RMSNorm
from valora.models.layers.uploads import upload

ATTENTION_BACKENDS = MM_ENCODER_ATTN_BACKENDS
GRAPH_BACKENDS = ("TRITON_ATTN", "FLASH_ATTN")  # whose launches depend on padded sizes only


def resolve_backend(name: str, pixels: torch.Tensor) -> str:
    """`auto`: the Triton kernel wherever the fused kernels run (CUDA), SDPA elsewhere."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown vision attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "auto":
        return "TRITON_ATTN" if fused_kernels.use_triton(pixels) else "TORCH_SDPA"
    if name in ("FLASH_ATTN", "FLEX_ATTENTION") and not pixels.is_cuda:
        raise ValueError(f"vision attention backend {name} needs a CUDA device")
    return name


@dataclass(frozen=True)
class VisionSpans:
    """Attention spans of one packed pass: consecutive runs of `lengths` rows attend within themselves."""

    backend: str
    lengths: tuple[int, ...]  # host, in row order (zero-length spans only pad a graph's fixed sizes)
    max_len: int  # an upper bound of the longest span (FLASH_ATTN sizes its grid by it)
    cu_seqlens: torch.Tensor | None = None  # [S + 1] int32: FLASH_ATTN
    tiles: torch.Tensor | None = None  # [N, 4] int32 (query row, query rows, key row, key rows): TRITON_ATTN
    block_m: int = 0  # the tiles' height
    block_mask: object = None  # FLEX_ATTENTION

    @staticmethod
    def build(lengths: Sequence[int], backend: str, device: torch.device, dtype: torch.dtype, head_dim: int, *,
              num_spans: int | None = None, max_len: int | None = None) -> VisionSpans:
        """The spans in the backend's form; `num_spans` / `max_len` pad the device tensors to fixed sizes (a graph's
        bucket) so that any lengths within them give tensors of the same shapes."""
        lens = np.asarray(lengths, dtype=np.int64)
        longest = int(lens.max(initial=0))
        max_len = max(max_len or 0, longest)
        if num_spans is not None and num_spans < len(lens):
            raise ValueError(f"{len(lens)} spans do not fit a table of {num_spans}")
        starts = np.concatenate([[0], np.cumsum(lens)])
        spans = dict(backend=backend, lengths=tuple(int(n) for n in lens), max_len=max_len)
        if backend == "FLASH_ATTN":
            cu = np.full((num_spans or len(lens)) + 1, starts[-1], dtype=np.int32)
            cu[: len(starts)] = starts
            return VisionSpans(**spans, cu_seqlens=upload(cu, device))
        if backend == "TRITON_ATTN":
            from valora.models.layers.attention_kernels import varlen_block_m

            bm = varlen_block_m(dtype, head_dim, max_len)
            per = -(-lens // bm)
            span = np.repeat(np.arange(len(lens)), per)
            first = np.repeat(np.cumsum(per) - per, per)
            m0 = starts[span] + (np.arange(len(span)) - first) * bm
            size = len(span) if num_spans is None else -(-int(starts[-1]) // bm) + num_spans
            tiles = np.zeros((size, 4), dtype=np.int32)  # rows = 0: an unused entry
            tiles[: len(span)] = np.stack([m0, np.minimum(bm, starts[span + 1] - m0), starts[span], lens[span]], 1)
            return VisionSpans(**spans, tiles=upload(tiles, device), block_m=bm)
        if backend == "FLEX_ATTENTION":
            return VisionSpans(**spans, block_mask=_document_mask(lens, device))
        return VisionSpans(**spans)


def _document_mask(lens: np.ndarray, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    doc = upload(np.repeat(np.arange(len(lens)), lens), device)
    rows = int(lens.sum())
    return create_block_mask(lambda b, h, q, k: doc[q] == doc[k], None, None, rows, rows, device=device)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True)


def vit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: VisionSpans) -> torch.Tensor:
    """q, k, v [rows, heads, head_dim] (any row and head strides) -> [rows, heads, head_dim], each row attending to
    every row of its span, scaled by 1/sqrt(head_dim)."""
    rows, heads, d = q.shape
    scale = d**-0.5
    if spans.backend == "TRITON_ATTN":
        from valora.models.layers.attention_kernels import varlen_attention

        out = torch.empty((rows, heads, d), dtype=q.dtype, device=q.device)
        return varlen_attention(q, k, v, spans.tiles, scale, out, spans.block_m)
    if spans.backend == "FLASH_ATTN":
        from torch.nn.attention.varlen import varlen_attn

        cu = spans.cu_seqlens  # (the default scale, non-causal: the call reads the same on every torch since 2.9)
        return varlen_attn(q, k, v, cu, cu, spans.max_len, spans.max_len)
    if spans.backend == "FLEX_ATTENTION":
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        out = _flex_attention()(q, k, v, block_mask=spans.block_mask, scale=scale)
        return out.squeeze(0).transpose(0, 1).contiguous()
    outs, start = [], 0
    for length, group in itertools.groupby(spans.lengths):
        n = len(list(group))
        if length == 0:
            continue
        qs, ks, vs = (t[start : start + n * length].view(n, length, heads, d).transpose(1, 2) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, scale=scale).transpose(1, 2).reshape(-1, heads, d))
        start += n * length
    return torch.cat(outs)


def patchify(pixel_values: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B * (H/p) * (W/p), C * p * p], patches row-major and each flattened as a conv kernel is
    (channel, row, column), so a Conv2d weight flattened with `flatten(1)` applies to it as a linear map."""
    b, c, h, w = pixel_values.shape
    if h % patch or w % patch:
        raise ValueError(f"image of {h}x{w} pixels is not a whole number of {patch}-pixel patches")
    x = pixel_values.view(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * (h // patch) * (w // patch), c * patch * patch)


class ViTAttention(nn.Module):
    """Bidirectional multi-head self-attention with q/k/v fused into one LoRA layer (PEFT names q/k/v_proj)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm_eps: float | None = None) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.qkv_proj = LoRALinear(dim, (dim, dim, dim), bias=qkv_bias, lora_names=("q_proj", "k_proj", "v_proj"))
        self.out_proj = LoRALinear(dim, dim, bias=True)
        # InternViT-6B normalises q and k over the whole width before splitting heads.
        self.q_norm = RMSNorm(dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(dim, qk_norm_eps) if qk_norm_eps is not None else None

    def forward(self, x: torch.Tensor, spans: VisionSpans, lora: LoRABatch | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x, lora).split(self.dim, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in (q, k, v))
        return self.out_proj(vit_attention(q, k, v, spans).view(-1, self.dim), lora)
