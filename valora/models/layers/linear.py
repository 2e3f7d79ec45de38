"""Linear layers with batched heterogeneous LoRA: y = x Wᵀ + b + Σ_slices lora_matmul(...).

A fused projection (qkv, gate/up) is one GEMM over concatenated weights; each output slice is one PEFT module
(`lora_names`), so adapters that target only some of them (say q and v) get rank 0 on the others.

Merging folds one adapter slot into a shadow copy of the weights, W' = W + s·B·A, computed in one pass that reads
W and writes W'. The checkpoint's W is never written, so unmerging is free and exact after any number of
switches; the price is one extra weight buffer per targeted layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from valora.lora.ops import lora_matmul
from valora.lora.ops.batch import LoRABatch
from valora.lora.ops.configs import dot_block_r
from valora.lora.ops.merge import merge_into
from valora.models.layers.aligned import aligned_empty


class LoRALinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_slices: int | Sequence[int],
        bias: bool = False,
        lora_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_slices = (out_slices,) if isinstance(out_slices, int) else tuple(out_slices)
        self.out_features = sum(self.out_slices)
        self.lora_names = tuple(lora_names) if lora_names is not None else None
        if self.lora_names is not None and len(self.lora_names) != len(self.out_slices):
            raise ValueError("one LoRA module name per output slice")
        # rows padded to 16 bytes where the width is not (layers/aligned.py): cuBLAS's fast kernels need it
        self.weight = nn.Parameter(aligned_empty((self.out_features, in_features)), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.lora_ranks: torch.Tensor | None = None
        self.lora_scalings: torch.Tensor | None = None
        self.lora_neg_scalings: torch.Tensor | None = None
        self.lora_backend: str | None = None
        self.merged_weight: torch.Tensor | None = None
        self.merged_slot: int | None = None

    @property
    def num_slices(self) -> int:
        return len(self.out_slices)

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        """(out, in) of one output slice (or all) of the whole layer: what an adapter's B and A are sized for."""
        return (self.out_slices[shard] if shard is not None else self.out_features), self.in_features

    def slice_offset(self, shard: int) -> int:
        return sum(self.out_slices[:shard])

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        """Copy a checkpoint tensor (`weight` or `bias`) into the whole layer or into one output slice.
        Convolution kernels whose stride equals their size (patch embeddings) are flattened to a linear map."""
        param = self.weight if name == "weight" else self.bias
        if tensor.dim() > 2:
            tensor = tensor.flatten(1)
        if param is None:
            raise ValueError(f"checkpoint has a {name} for a layer built without one")
        if shard is not None:
            param = param.narrow(0, self.slice_offset(shard), self.out_slices[shard])
        if tuple(param.shape) != tuple(tensor.shape):
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(param.shape)}"
            )
        param.data.copy_(tensor)

    def enable_lora(self, max_loras: int, max_rank: int, scalings: torch.Tensor, neg_scalings: torch.Tensor,
                    backend: str) -> None:
        """Allocate this layer's adapter slots; the per-slot scalings (and their negation, for corrections) are
        model-wide tensors, shared rather than copied."""
        opts = dict(dtype=self.weight.dtype, device=self.weight.device)
        self.lora_a = torch.zeros(max_loras, self.num_slices * max_rank, self.in_features, **opts)
        self.lora_b = torch.zeros(max_loras, self.out_features, max_rank, **opts)
        self.lora_ranks = torch.zeros(self.num_slices, max_loras, dtype=torch.int32, device=self.weight.device)
        self.lora_scalings, self.lora_neg_scalings = scalings, neg_scalings
        self.lora_backend = backend

    @property
    def max_rank(self) -> int:
        return 0 if self.lora_b is None else self.lora_b.shape[2]

    def set_slot(self, slot: int, shard: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one slice of an adapter into `slot`; `a` is [r, in], `b` is [out_slice, r]; None clears it."""
        assert self.lora_a is not None and self.lora_b is not None and self.lora_ranks is not None
        rmax = self.max_rank
        if a is None or b is None:
            self.lora_ranks[shard, slot] = 0
            return
        r = a.shape[0]
        self.lora_a[slot, shard * rmax : shard * rmax + r].copy_(a, non_blocking=True)
        off = self.slice_offset(shard)
        self.lora_b[slot, off : off + self.out_slices[shard], :r].copy_(b, non_blocking=True)
        self.lora_ranks[shard, slot] = r

    def reserve_merged(self) -> None:
        """Allocate the shadow weights up front, so the memory is accounted for before the KV cache is sized."""
        if self.merged_weight is None:
            self.merged_weight = aligned_empty(tuple(self.weight.shape), self.weight.dtype, self.weight.device)

    @torch.no_grad()
    def merge(self, slot: int, ranks: Sequence[int], scale: float) -> None:
        """Compute W' = W + scale·B·A for `slot` (per-slice ranks given from the host, so no device sync) and
        serve from it, all slices in one launch. A layer the adapter does not target stays on W and needs no
        corrections."""
        if not any(ranks):
            self.merged_slot = None
            return
        self.reserve_merged()
        self._merge_into_shadow(slot, ranks, scale)
        self.merged_slot = slot

    def compile_merges(self) -> None:
        """Under `lora.ops.jit.compile_only()`: build the merge kernel for every rank tile an adapter of this layer
        can need (the kernel's one specialisation), so the first switch to merged mode does not compile. Nothing
        to build where no shadow weights were reserved: the scheduler never merges."""
        if self.merged_weight is None or self.lora_b is None:
            return
        for block_r in sorted({dot_block_r(r) for r in range(1, self.max_rank + 1)}):
            self._merge_into_shadow(0, [min(block_r, self.max_rank)] * self.num_slices, 1.0)

    def _merge_into_shadow(self, slot: int, ranks: Sequence[int], scale: float) -> None:
        assert self.lora_a is not None and self.lora_b is not None and self.merged_weight is not None
        merge_into(self.merged_weight, self.weight, self.lora_b[slot], self.lora_a[slot], scale, ranks,
                   self.out_slices, self.max_rank)

    @property
    def active_weight(self) -> torch.Tensor:
        """The weights the base GEMM reads: the merged copy while an adapter is merged in."""
        return self.merged_weight if self.merged_slot is not None else self.weight

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        y = nn.functional.linear(x, self.active_weight, self.bias)
        self.add_lora(x, y, lora)
        return y

    def add_lora(self, x: torch.Tensor, y: torch.Tensor, lora: LoRABatch | None) -> None:
        """y += each token's own adapter delta, and, while an adapter is merged, minus it for the other tokens."""
        if lora is None or self.lora_a is None:
            return
        if lora.own is not None:
            lora_matmul(x, None, self.lora_a, self.lora_b, self.lora_ranks, self.lora_scalings, self.lora_backend,
                        slices=self.out_slices, out=y, meta=lora.own)
        if self.merged_slot is not None and lora.correction is not None:
            lora_matmul(x, None, self.lora_a, self.lora_b, self.lora_ranks, self.lora_neg_scalings,
                        self.lora_backend, slices=self.out_slices, out=y, meta=lora.correction)
