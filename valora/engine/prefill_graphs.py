"""Short prefill steps replayed from CUDA graphs, so a prompt's prefill costs its kernels and not the host's launches.

Eagerly, a prefill step launches about ten kernels per LM layer from Python; on the H100 host that took longer than
the GPU work of a one-image request's ~270 tokens on a 7B LM, so the time to first token was launch-bound
(docs/benchmarks.md, "Vision tower"). A step is replayed here when every sequence in it runs several tokens (prompt,
chunk or recompute: no decodes), none of them with adapter work (no adapter tokens, no merged layers), with at most
`MAX_SEQS` sequences and `max_tokens` tokens. The LM layers then run on static buffers padded to a token bucket
(`token_buckets`): the input embeddings (token and image rows, computed eagerly first; the vision pass replays its
own graphs), positions, KV slots (padding rows write theirs to the runner's pad slot, which no sequence reads), and
per sequence its query start, query length, context length and block table (padding entries have no queries). The
prefill attention grid is sized by the bucket; programs past a sequence's queries exit at once. Padding rows belong
to no sequence, so no real row ever reads them. A graph is captured per bucket the first time a step needs it, all
in one memory pool.

With `capture=False` (`--enforce-eager`) the same padded batches run eagerly: the numbers a graph computes.
"""

from __future__ import annotations

import logging
import time

import torch

from valora.models.cuda_graph import capture_graph
from valora.models.forward_batch import ForwardBatch
from valora.models.layers.attention import AttentionMeta
from valora.models.layers.linear import LoRALinear

logger = logging.getLogger(__name__)

MAX_SEQS = 8  # prefill sequences per graph step (the attention grid's third axis)
DEFAULT_MAX_TOKENS = 1024  # beyond this the GPU work outlasts the launches anyway


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts with a graph: every 32 up to 256, every 64 up to 512, every 128 beyond, up to `max_tokens`
    (rounded up to 32): a one-image prompt pads by at most 32 rows."""
    sizes, n = [], 32
    while n < max_tokens:
        sizes.append(n)
        n += 32 if n < 256 else 64 if n < 512 else 128
    return [*sizes, -(-max_tokens // 32) * 32]


class PrefillGraphs:
    def __init__(self, model: torch.nn.Module, kv_caches: list, *, max_blocks_per_seq: int, block_size: int,
                 pad_slot: int, device: torch.device, capture: bool = True,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.model, self.kv_caches, self.device, self.capture = model, kv_caches, device, capture
        self.block_size, self.pad_slot = block_size, pad_slot
        self.buckets = token_buckets(max_tokens)
        self.lm_layers = [m for m in model.language_model.modules() if isinstance(m, LoRALinear)]
        n, embed = self.buckets[-1], model.language_model.embed_tokens.weight
        ints = dict(dtype=torch.int32, device=device)
        self.embeds = torch.zeros(n, embed.shape[1], dtype=embed.dtype, device=device)
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.q_starts = torch.zeros(MAX_SEQS, **ints)
        self.q_lens = torch.zeros(MAX_SEQS, **ints)
        self.context_lens = torch.zeros(MAX_SEQS, **ints)
        self.block_tables = torch.zeros(MAX_SEQS, max_blocks_per_seq, **ints)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def usable(self, batch: ForwardBatch) -> bool:
        """Prefills only (no decode rows), no adapter work, within the buckets."""
        a = batch.attn
        return (a.decode_rows is None and a.prefill_q_starts is not None and len(a.prefill_host) <= MAX_SEQS
                and batch.input_ids.shape[0] <= self.buckets[-1] and batch.merged_slot is None
                and all(s < 0 for s in batch.lora_slots) and all(m.merged_slot is None for m in self.lm_layers))

    def run(self, embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of a `usable` batch whose LM input rows are `embeds`."""
        t = embeds.shape[0]
        b = self.bucket(t)
        self._fill(embeds, batch, t, b)
        static = self._static_batch(b, batch.attn.prefill_host)
        if not self.capture:
            return self.model.language_model(self.embeds[:b], self.kv_caches, static)[:t]
        if b not in self.graphs:
            start = time.perf_counter()
            self.graphs[b] = capture_graph(lambda: self.model.language_model(self.embeds[:b], self.kv_caches, static),
                                           self.device, self.pool)
            self.pool = self.pool or self.graphs[b][0].pool()
            self.capture_seconds += time.perf_counter() - start
            logger.info("captured a prefill graph for %d tokens in %.2f s", b, time.perf_counter() - start)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:t]

    def _fill(self, embeds: torch.Tensor, batch: ForwardBatch, t: int, b: int) -> None:
        a = batch.attn
        s, w = a.prefill_block_tables.shape
        self.embeds[:t].copy_(embeds)
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:, :t].copy_(batch.positions if batch.positions.dim() == 2 else batch.positions.expand(3, -1))
        self.slot_mapping[:t].copy_(a.slot_mapping)
        self.slot_mapping[t:b].fill_(self.pad_slot)
        self.q_starts[:s].copy_(a.prefill_q_starts)
        self.q_lens[:s].copy_(a.prefill_q_lens)
        self.q_lens[s:].zero_()  # padding entries: no queries
        self.context_lens[:s].copy_(a.prefill_context_lens)
        self.block_tables[:s, :w].copy_(a.prefill_block_tables)

    def _static_batch(self, b: int, host: tuple[tuple[int, int, int], ...]) -> ForwardBatch:
        """The bucket's batch over the static buffers. `host` (the step's own sequences) is read only by the PyTorch
        attention path, which runs eagerly; the Triton kernels read the device tensors and the bucket's size."""
        attn = AttentionMeta(
            slot_mapping=self.slot_mapping[:b], block_size=self.block_size, prefill_q_starts=self.q_starts,
            prefill_q_lens=self.q_lens, prefill_context_lens=self.context_lens, prefill_block_tables=self.block_tables,
            prefill_host=host, prefill_max_q_len=b,
        )
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:, :b], attn=attn,
                            logits_rows=self.input_ids[:0])  # (the LM layers read no logits rows)
