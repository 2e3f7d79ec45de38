"""Decode steps replayed from CUDA graphs, so a step costs its kernels and not Python or launch overhead.

A graph is captured per batch-size bucket and per LoRA variant (graph_lora.py: how many distinct adapters the
step's own-adapter tokens use, as a bucket of its own, 1, 2, 4, ... up to the batch size or `max_loras`, 0 for a step
without any; corrections for a merged adapter; which layers serve merged weights). Every input lives in a static
buffer that a replay refills: token ids, positions, KV slots, block tables and context lengths, and the LoRA
metadata. A batch smaller than its bucket is padded with rows that attend to nothing, write their K/V to a slot no
sequence owns and carry no adapter.

Start-up captures, with a progress bar, every batch size without adapters and with its largest adapter bucket
(which serves any mix), then the smaller adapter buckets while the capture budget lasts; the rest are captured
when a step first needs them. Which bucket a step runs in depends on the step alone, never on what was captured,
so outputs do not depend on the order of capture.

With `capture=False` (`--enforce-eager`) the same padded static batches run eagerly: a decode step then computes
exactly the numbers its graph would (same shapes, same kernels, same LoRA tile configurations), so eager and
graph outputs are equal token for token, and eager mode stays useful for debugging a graph.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from valora.engine.graph_lora import GraphLoRA, LoRAVariant, adapter_buckets
from valora.lora.ops.meta import LoRAMeta
from valora.models.cuda_graph import capture_graph
from valora.models.forward_batch import ForwardBatch
from valora.models.layers.attention import AttentionMeta

logger = logging.getLogger(__name__)

# Seconds of start-up capture after the graphs every deployment needs; the remaining adapter buckets are captured
# when first used (the H100 captured 30 graphs in 12.8 s; the start-up target is under 30 s in all).
CAPTURE_BUDGET_S = 15.0


def batch_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 8 up to 64, every 16 up to 128, every 32 beyond."""
    sizes = [1, 2, 4]
    b = 8
    while b < max_num_seqs:
        sizes.append(b)
        b += 8 if b < 64 else 16 if b < 128 else 32
    sizes.append(max_num_seqs)
    return sorted({s for s in sizes if s <= max_num_seqs})


@dataclass(frozen=True)
class Variant:
    size: int  # batch bucket
    lora: LoRAVariant


class CUDAGraphRunner:
    def __init__(self, model: torch.nn.Module, kv_caches: list, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, pad_slot: int, max_loras: int, device: torch.device, capture: bool = True) -> None:
        self.model, self.kv_caches, self.device, self.capture = model, kv_caches, device, capture
        self.buckets = batch_buckets(max_num_seqs)
        self.block_size, self.pad_slot = block_size, pad_slot
        self.lora = GraphLoRA(model, max_loras, device)
        n, opts = self.buckets[-1], dict(dtype=torch.int32, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.rows = torch.arange(n, device=device)
        self.context_lens = torch.zeros(n, **opts)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, **opts)
        self.graphs: dict[Variant, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def bucket(self, size: int) -> int | None:
        return next((b for b in self.buckets if b >= size), None)

    def variant(self, batch: ForwardBatch) -> Variant:
        """The graph a decode-only `batch` runs in."""
        b = self.bucket(batch.input_ids.shape[0])
        return Variant(b, self.lora.variant(b, batch))

    def usable(self, batch: ForwardBatch) -> bool:
        """A step can replay a graph when every sequence decodes one token, with no image, within the buckets."""
        a = batch.attn
        return (batch.images is None and not a.prefill_host and a.decode_rows is not None
                and len(batch.lora_slots) <= self.buckets[-1] and self.lora.usable(batch))

    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """Hidden states [T, hidden] of a decode-only `batch`."""
        t = batch.input_ids.shape[0]
        v = self.variant(batch)
        self._fill(batch, t, v.size)
        self.lora.fill(v.size, v.lora, batch)
        if not self.capture:
            return self.model(self._static_batch(v), self.kv_caches)[:t]
        if v not in self.graphs:
            self.graphs[v] = self._capture(v)
        graph, out = self.graphs[v]
        graph.replay()
        return out[:t]

    def lora_metas(self) -> list[LoRAMeta]:
        """The LoRA metadata these graphs can read."""
        return self.lora.metas(self.buckets)

    def _fill(self, batch: ForwardBatch, t: int, b: int) -> None:
        a = batch.attn
        self.input_ids[:t].copy_(batch.input_ids)
        pos = batch.positions if batch.positions.dim() == 2 else batch.positions.expand(3, -1)
        self.positions[:, :t].copy_(pos)
        self.slot_mapping[:t].copy_(a.slot_mapping)
        self.context_lens[:t].copy_(a.decode_context_lens)
        self.block_tables[:t, : a.decode_block_tables.shape[1]].copy_(a.decode_block_tables)
        if b > t:  # padding rows: no keys, a K/V slot nobody owns
            self.slot_mapping[t:b].fill_(self.pad_slot)
            self.context_lens[t:b].zero_()

    def _static_batch(self, v: Variant) -> ForwardBatch:
        b = v.size
        attn = AttentionMeta(
            slot_mapping=self.slot_mapping[:b], block_size=self.block_size, decode_rows=self.rows[:b],
            decode_context_lens=self.context_lens[:b], decode_block_tables=self.block_tables[:b],
            decode_max_context=self.block_tables.shape[1] * self.block_size,
        )
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:, :b], attn=attn,
                            logits_rows=self.rows[:b], lora=self.lora.batch(b, v.lora))

    def _capture(self, v: Variant) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        start = time.perf_counter()
        batch = self._static_batch(v)
        graph, out = capture_graph(lambda: self.model(batch, self.kv_caches), self.device, self.pool)
        self.pool = self.pool or graph.pool()
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        logger.debug("captured a decode graph for %s in %.2f s", v, seconds)
        return graph, out

    def capture_common(self, budget_s: float = CAPTURE_BUDGET_S) -> None:
        """Capture, largest batch first (later graphs fit in its memory pool), every batch size without adapters
        and with its largest adapter bucket; then the smaller adapter buckets, fewest adapters first, while
        `budget_s` seconds last. Whatever is left is captured when a step first needs it."""
        if not self.capture:
            return
        start = time.perf_counter()
        lora = self.lora.enabled and self.lora.capturable
        max_loras = self.lora.max_loras
        sizes = list(reversed(self.buckets))
        common = [Variant(b, self.lora.unmerged(a)) for b in sizes
                  for a in ((0, adapter_buckets(b, max_loras)[-1]) if lora else (0,))]
        extra = sorted((Variant(b, self.lora.unmerged(a)) for b in sizes if lora
                        for a in adapter_buckets(b, max_loras)[:-1]), key=lambda v: (v.lora.adapters, -v.size))
        self.slot_mapping.fill_(self.pad_slot)  # nothing real yet: every row is padding
        bar = tqdm(total=len(common) + len(extra), desc="Capturing CUDA graphs", unit="graph", disable=None)
        for v in common + extra:
            if v in extra and time.perf_counter() - start > budget_s:
                break
            if v not in self.graphs:
                if v.lora.adapters:
                    self.lora.own_meta(v.size, v.lora.adapters).fill([])
                self.graphs[v] = self._capture(v)
            bar.update()
        bar.close()
        left = sum(v not in self.graphs for v in common + extra)
        logger.info("captured %d decode CUDA graphs in %.1f s (batch sizes %s%s)%s", len(self.graphs),
                    time.perf_counter() - start, ",".join(map(str, self.buckets)),
                    f"; up to {min(self.buckets[-1], max_loras)} adapters" if lora else "",
                    f"; {left} more at first use" if left else "")
