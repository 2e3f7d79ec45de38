"""The LoRA side of a CUDA-graph batch, shared by the decode graphs (cuda_graphs.py) and the token-bucket graphs
(token_graphs.py).

A graph's LoRA kernels read static metadata (`GraphLoRAMeta`: per-token slots, tokens grouped by adapter, exact tile
maps) refilled before every replay and sized for the graph's rows and an *adapter bucket*: how many distinct adapters
the tokens that run their own adapter use, rounded up to a power of two (or `max_loras`), so the kernels launch the
grid and use the tiles of about the adapter count the step has, not of the worst case (vLLM's
`--specialize-active-lora`). A graph is specific, too, to whether some token takes a merged adapter back out (mixture
mode) and to which layers serve merged weights (`LoRAVariant`).

Weights, adapter stacks, ranks and scalings are read through pointers the graph keeps: loading an adapter writes into
its slot of the stacks, and merging writes into the layer's shadow weights, so neither invalidates a graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valora.lora.ops.batch import LoRABatch
from valora.lora.ops.meta import GraphLoRAMeta, LoRAMeta
from valora.models.forward_batch import ForwardBatch
from valora.models.layers.linear import LoRALinear

GRAPH_BACKENDS = ("atmm", "sgmv", "bgmv", "gather")  # LoRA backends whose launches depend on shapes only


def adapter_buckets(size: int, max_loras: int) -> list[int]:
    """Distinct-adapter counts with a graph of `size` rows: powers of two below min(size, max_loras), and that bound
    itself."""
    top = min(size, max_loras)
    return [1 << i for i in range(top.bit_length()) if 1 << i < top] + [top]


@dataclass(frozen=True)
class LoRAVariant:
    adapters: int  # adapter bucket of the tokens that run their own adapter (0: none does)
    correction: bool  # some token takes the merged adapter back out (mixture mode)
    merged: tuple[bool, ...]  # per LoRA layer of the language model: serving merged weights


class GraphLoRA:
    """The static LoRA metadata of one family of graphs, made at first use per (rows, adapter bucket)."""

    def __init__(self, model: torch.nn.Module, max_loras: int, device: torch.device) -> None:
        self.layers = [m for m in model.language_model.modules() if isinstance(m, LoRALinear)]
        backends = {m.lora_backend for m in self.layers if m.lora_a is not None}
        self.enabled = bool(backends)  # the model has adapter slots at all
        self.capturable = backends <= set(GRAPH_BACKENDS)
        self.max_loras, self.device = max_loras, device
        self.own: dict[tuple[int, int], GraphLoRAMeta] = {}  # (rows, adapter bucket)
        self.corrections: dict[int, GraphLoRAMeta] = {}  # rows

    def usable(self, batch: ForwardBatch) -> bool:
        """A graph can run the batch's LoRA work: the backend's launches depend on shapes only, or there is none."""
        return self.capturable or (batch.merged_slot is None and all(s < 0 for s in batch.lora_slots))

    def variant(self, rows: int, batch: ForwardBatch) -> LoRAVariant:
        """The variant of a graph of `rows` rows that `batch` runs in."""
        merged = batch.merged_slot
        distinct = len({s for s in batch.lora_slots if s >= 0 and s != merged})
        adapters = next(a for a in adapter_buckets(rows, self.max_loras) if a >= distinct) if distinct else 0
        return LoRAVariant(adapters, merged is not None and any(s != merged for s in batch.lora_slots),
                           self.merged_layers())

    def metas(self, rows: list[int]) -> list[LoRAMeta]:
        """Every LoRA metadata that graphs of these row counts can read (a correction's has the layout of the
        one-adapter bucket's), none where no graph runs LoRA kernels."""
        if not (self.enabled and self.capturable):
            return []
        return [self.own_meta(r, a).meta for r in rows for a in adapter_buckets(r, self.max_loras)]

    def unmerged(self, adapters: int) -> LoRAVariant:
        """The variant of a step whose tokens use `adapters` (a bucket) distinct adapters, nothing merged."""
        return LoRAVariant(adapters, False, tuple(False for _ in self.layers))

    def merged_layers(self) -> tuple[bool, ...]:
        return tuple(m.merged_slot is not None for m in self.layers)

    def own_meta(self, rows: int, adapters: int) -> GraphLoRAMeta:
        if (rows, adapters) not in self.own:
            self.own[rows, adapters] = GraphLoRAMeta(rows, adapters, self.device)
        return self.own[rows, adapters]

    def correction_meta(self, rows: int) -> GraphLoRAMeta:
        if rows not in self.corrections:
            self.corrections[rows] = GraphLoRAMeta(rows, 1, self.device)
        return self.corrections[rows]

    def fill(self, rows: int, v: LoRAVariant, batch: ForwardBatch) -> None:
        """Write the batch's adapter layout into the variant's metadata (rows past the batch's: no adapter)."""
        merged = batch.merged_slot
        if v.adapters:
            self.own_meta(rows, v.adapters).fill([s if s != merged else -1 for s in batch.lora_slots])
        if v.correction:
            self.correction_meta(rows).fill([merged if s != merged else -1 for s in batch.lora_slots])

    def batch(self, rows: int, v: LoRAVariant) -> LoRABatch | None:
        """The `LoRABatch` a graph of the variant reads: views of the static metadata."""
        if not (v.adapters or v.correction):
            return None
        return LoRABatch(self.own_meta(rows, v.adapters).meta if v.adapters else None,
                         self.correction_meta(rows).meta if v.correction else None)
