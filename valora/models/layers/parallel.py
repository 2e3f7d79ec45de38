"""Tensor-parallel layers (Megatron-style sharding, S-LoRA-style adapters), each the plain layer at one rank.

A decoder layer communicates twice: after o_proj and after down_proj (one all-reduce each). q/k/v and gate/up are
column-parallel (each rank computes its share of the heads and of the MLP's hidden units, no communication),
o/down row-parallel (each rank multiplies its share of the input columns; the all-reduce sums the partials).

Adapters are sharded like the weights they adapt:
- column-parallel: A (r x in) whole on every rank, B (out x r) split by output rows like W;
- row-parallel: A split by input columns like W, B whole. Each rank adds its partial s·(x_k A_kᵀ)Bᵀ to its partial
  output before the all-reduce, which sums them into s·(x Aᵀ)Bᵀ: S-LoRA's all-reduce of the rank-sized x·A rides
  in the layer's own, so adapters add no collective at all (vLLM's default sharding is the same).
So merged and mixture modes work per rank on its shard: W_k + s·B_k·A (column) and W_k + s·B·A_k (row) are exactly
the rank's shard of W + s·B·A.

Vocabulary: the embedding and the LM head hold rows [k·V/n, (k+1)·V/n) of the (padded) vocabulary; a lookup
zeroes the ids of other ranks and all-reduces, the head all-gathers its logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from valora.distributed.state import TensorParallel, all_gather, all_reduce, tp
from valora.lora.ops.batch import LoRABatch
from valora.models.layers.linear import LoRALinear


def head_shard(group: TensorParallel, heads: int, head_dim: int) -> tuple[int, int]:
    """(first row, rows) of this rank's heads: an even share, or, with fewer heads than ranks, the one head that its
    group of `world_size / heads` ranks shares (KV heads under grouped-query attention)."""
    n = group.world_size
    if heads >= n:
        start, count = group.split(heads, "the number of heads")
    elif n % heads == 0:
        start, count = group.rank // (n // heads), 1
    else:
        raise ValueError(f"{heads} heads cannot be spread over tensor_parallel_size {n}")
    return start * head_dim, count * head_dim


def kv_heads_per_rank(num_kv_heads: int) -> int:
    """KV heads whose cache this rank holds (all of them without tensor parallelism)."""
    return head_shard(tp(), num_kv_heads, 1)[1]


class ColumnParallelLinear(LoRALinear):
    """Output slice j of the full layer (`full_slices[j]` rows) is `shards[j]` = (first row, rows) here: those rows
    of W, b and B."""

    def __init__(self, in_features: int, out_slices: int | Sequence[int], bias: bool = False,
                 lora_names: Sequence[str] | None = None, shards: Sequence[tuple[int, int]] | None = None) -> None:
        self.full_slices = (out_slices,) if isinstance(out_slices, int) else tuple(out_slices)
        self.shards = tuple(shards) if shards is not None else tuple(
            tp().split(w, "an output width") for w in self.full_slices)
        super().__init__(in_features, tuple(n for _, n in self.shards), bias, lora_names)

    def _rows(self, tensor: torch.Tensor, shard: int | None) -> torch.Tensor:
        """This rank's rows of one slice (`shard`) or of the whole fused tensor."""
        if shard is not None:
            return tensor.narrow(0, *self.shards[shard])
        return torch.cat([t.narrow(0, *s) for t, s in zip(tensor.split(self.full_slices), self.shards)])

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return (self.full_slices[shard] if shard is not None else sum(self.full_slices)), self.in_features

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        super().load_weight(name, self._rows(tensor, shard), shard)

    def set_slot(self, slot: int, shard: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        super().set_slot(slot, shard, a, None if b is None else self._rows(b, shard))


class RowParallelLinear(LoRALinear):
    """The input arrives split by columns (`shard` = (first column, columns) of this rank); the output is whole."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard: tuple[int, int] | None = None) -> None:
        self.tp = tp()
        self.full_in = in_features
        self.shard = shard if shard is not None else self.tp.split(in_features, "an input width")
        super().__init__(self.shard[1], out_features, bias)

    def full_shape(self, shard: int | None) -> tuple[int, int]:
        return self.out_features, self.full_in

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        super().load_weight(name, tensor.narrow(1, *self.shard) if name == "weight" else tensor, shard)

    def set_slot(self, slot: int, shard: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        super().set_slot(slot, shard, None if a is None else a.narrow(1, *self.shard), b)

    def forward(self, x: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
        if not self.tp.enabled:
            return super().forward(x, lora)
        y = F.linear(x, self.active_weight)
        self.add_lora(x, y, lora)  # partial products of this rank's columns: the all-reduce sums them
        all_reduce(y)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rows [k·P, (k+1)·P) of the vocabulary padded to n·P rows; ids of other ranks look up zeros."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp, self.vocab_size = tp(), vocab_size
        per_rank = -(-vocab_size // self.tp.world_size)
        self.start = self.tp.rank * per_rank
        self.weight = nn.Parameter(torch.zeros(per_rank, hidden_size), requires_grad=False)

    def load_weight(self, name: str, tensor: torch.Tensor, shard: int | None = None) -> None:
        if name != "weight" or tensor.shape[0] != self.vocab_size or tensor.shape[1] != self.weight.shape[1]:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} for a vocabulary of "
                             f"{self.vocab_size} x {self.weight.shape[1]}")
        rows = tensor[self.start : self.start + self.weight.shape[0]]
        self.weight.data[: rows.shape[0]].copy_(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.enabled:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(out.masked_fill(outside.unsqueeze(-1), 0))


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of this rank's vocabulary rows, all-gathered into the whole vocabulary on every rank."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = all_gather(F.linear(hidden, self.weight), dim=-1)
        return logits[..., : self.vocab_size]
