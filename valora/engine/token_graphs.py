"""Steps with prefill work replayed from CUDA graphs of their token bucket, so a step costs its kernels and not the
host's launches: prefills alone (prompts, chunks, recomputes) and prefill chunks mixed with running decodes, with or
without adapters.

Eagerly, an LM layer of such a step launches about ten kernels from Python, and several more per LoRA-targeted
linear; on the H100 host (~60 us a launch) a 7B step with adapters spent 43-124 ms launching what its GPU does in
a fraction of that (docs/benchmarks.md). Under chunked prefill at saturation about half of all steps mix decodes
with a chunk, so they, not the decode steps, set the throughput.

A step is replayed here when it has at most `MAX_SEQS` sequences with several tokens (at least one, or image rows)
and, decodes and a padding row included, fits the largest bucket. Its input embeddings (token and image rows; the
vision pass replays its own graphs) are computed eagerly into a static buffer, then one replay runs every LM layer
on static buffers padded to a token bucket (`token_buckets`): positions, KV slots (padding rows write theirs to the
runner's pad slot, which no sequence reads), per prefill sequence its query start, query length, context length and
block table (padding entries have no queries; the prefill attention grid is sized by the bucket), per decode its
row, context length and block table, and the LoRA metadata (graph_lora.py). The decode part has an entry for every
sequence the scheduler may run (`max_num_seqs`, so its split-KV grid is one shape); entries past the step's decodes
have no keys and write their zero output to a padding row, so every graph has one. A step without decodes runs the
same graph, all its decode entries padding (their kernel exits at once): one graph per bucket serves both kinds of
step, half the graphs to capture and keep of one per bucket for each kind. Padding rows belong to no sequence, so no
real row ever reads them.

A graph is kept per (bucket, LoRA variant); start-up captures the common ones, the rest are captured the first time
a step needs them; all share one memory pool and copy their output into one static buffer, so their memory is that
of the largest one.

With `capture=False` (`--enforce-eager`) the same padded batches run eagerly: the numbers a graph computes.
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

MAX_SEQS = 8  # sequences with several tokens per graph step (the prefill attention grid's third axis)
# Steps up to this many tokens replay: the default budget of chunked prefill. An eager step of 2048 tokens with
# adapters still spent longer launching than computing on the H100.
DEFAULT_MAX_TOKENS = 2048
# Seconds of start-up capture (capture_common); the rest are captured when a step first needs them.
CAPTURE_BUDGET_S = 10.0


def token_buckets(max_tokens: int) -> list[int]:
    """Token counts with a graph: every 32 up to 256, every 64 up to 512, every 128 beyond, up to `max_tokens`
    (rounded up to 32): a one-image prompt pads by at most 32 rows, a large step by at most 6%."""
    sizes, n = [], 32
    while n < max_tokens:
        sizes.append(n)
        n += 32 if n < 256 else 64 if n < 512 else 128
    return [*sizes, -(-max_tokens // 32) * 32]


@dataclass(frozen=True)
class TokenVariant:
    tokens: int  # token bucket
    lora: LoRAVariant


class TokenGraphs:
    max_seqs = MAX_SEQS  # sequences with prompt work a step may have (the engine's scheduler keeps to it)

    def __init__(self, model: torch.nn.Module, kv_caches: list, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, pad_slot: int, max_loras: int, device: torch.device, capture: bool = True,
                 max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        self.model, self.kv_caches, self.device, self.capture = model, kv_caches, device, capture
        self.block_size, self.pad_slot = block_size, pad_slot
        self.buckets = token_buckets(max_tokens + 1)  # + 1: a whole budget of tokens, and the padding row
        self.lora = GraphLoRA(model, max_loras, device)
        n, embed = self.buckets[-1], model.language_model.embed_tokens.weight
        ints = dict(dtype=torch.int32, device=device)
        self.embeds = torch.zeros(n, embed.shape[1], dtype=embed.dtype, device=device)
        self.hidden = torch.zeros_like(self.embeds) if capture else None  # every graph's output
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)  # (the LM layers read no token ids)
        self.positions = torch.zeros(3, n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), pad_slot, dtype=torch.long, device=device)
        self.q_starts = torch.zeros(MAX_SEQS, **ints)
        self.q_lens = torch.zeros(MAX_SEQS, **ints)
        self.context_lens = torch.zeros(MAX_SEQS, **ints)
        self.block_tables = torch.zeros(MAX_SEQS, max_blocks_per_seq, **ints)
        self.decode_rows = torch.zeros(max_num_seqs, dtype=torch.long, device=device)
        self.decode_context_lens = torch.zeros(max_num_seqs, **ints)
        self.decode_block_tables = torch.zeros(max_num_seqs, max_blocks_per_seq, **ints)
        self.graphs: dict[TokenVariant, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def bucket(self, tokens: int) -> int:
        return next(b for b in self.buckets if b >= tokens)

    def usable(self, batch: ForwardBatch) -> bool:
        """The step has prompt work the decode graphs cannot take (some sequence runs several tokens, or some row
        is an image's: the decode graphs take token ids only), at most MAX_SEQS sequences run several tokens, the
        whole step and a padding row fit the buckets, and its LoRA work can be captured. Image rows alone come from
        a prompt's chunk cut to the one token that reaches its image (an image's vision pass charging the token
        budget); eagerly such a step cost the host 30-36 ms of launches on the H100, five times a decode step."""
        a = batch.attn
        prompt_work = len(a.prefill_host) > 0 or batch.images is not None
        return (prompt_work and len(a.prefill_host) <= MAX_SEQS and batch.input_ids.shape[0] + 1 <= self.buckets[-1]
                and self.lora.usable(batch))

    def variant(self, batch: ForwardBatch) -> TokenVariant:
        b = self.bucket(batch.input_ids.shape[0] + 1)
        return TokenVariant(b, self.lora.variant(b, batch))

    def run(self, embeds: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states [T, hidden] of a `usable` batch whose LM input rows are `embeds`."""
        t = embeds.shape[0]
        v = self.variant(batch)
        self._fill(embeds, batch, t, v)
        self.lora.fill(v.tokens, v.lora, batch)
        if not self.capture:
            return self._forward(v, batch.attn.prefill_host)[:t]
        if v not in self.graphs:
            self._capture(v, batch.attn.prefill_host)
        self.graphs[v].replay()
        return self.hidden[:t]

    def startup_variants(self) -> list[TokenVariant]:
        """Every unmerged variant, in the order start-up captures them: each adapter tier in turn (the largest
        adapter bucket, none, then the smaller buckets from the largest down; the end-to-end sweep's steps with
        prefill work mostly had the largest), largest token bucket first (later graphs fit in its memory pool)."""
        lora = self.lora.enabled and self.lora.capturable

        def tiers(b: int) -> list[int]:
            buckets = adapter_buckets(b, self.lora.max_loras) if lora else []
            return [*buckets[-1:], 0, *reversed(buckets[:-1])]

        return [TokenVariant(b, self.lora.unmerged(tiers(b)[i]))
                for i in range(len(tiers(self.buckets[-1]))) for b in reversed(self.buckets) if i < len(tiers(b))]

    def capture_common(self, budget_s: float = CAPTURE_BUDGET_S) -> None:
        """Capture `startup_variants` while `budget_s` seconds last; the rest, and the mixture variants (they need
        an adapter merged), are captured at first use, their kernels built by then (engine/kernel_warmup.py), so
        such a capture costs its step about 0.1 s on the H100."""
        if not self.capture:
            return
        start = time.perf_counter()
        variants = self.startup_variants()
        self.slot_mapping.fill_(self.pad_slot)  # nothing real yet: every row is padding, no sequence has queries
        self.q_lens.zero_()
        self.decode_context_lens.zero_()
        bar = tqdm(total=len(variants), desc="Capturing token-bucket graphs", unit="graph", disable=None)
        for v in variants:
            if time.perf_counter() - start >= budget_s:
                break
            if v not in self.graphs:
                if v.lora.adapters:
                    self.lora.own_meta(v.tokens, v.lora.adapters).fill([])
                self._capture(v, (), startup=True)
            bar.update()
        bar.close()
        left = sum(v not in self.graphs for v in variants)
        logger.info("captured %d token-bucket CUDA graphs in %.1f s (up to %d tokens)%s", len(self.graphs),
                    time.perf_counter() - start, self.buckets[-1], f"; {left} more at first use" if left else "")

    def lora_metas(self) -> list[LoRAMeta]:
        """The LoRA metadata these graphs can read."""
        return self.lora.metas(self.buckets)

    def _forward(self, v: TokenVariant, host: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
        return self.model.language_model(self.embeds[: v.tokens], self.kv_caches, self._static_batch(v, host))

    def _capture(self, v: TokenVariant, host: tuple[tuple[int, int, int], ...], startup: bool = False) -> None:
        start = time.perf_counter()
        b = v.tokens
        graph, _ = capture_graph(lambda: self.hidden[:b].copy_(self._forward(v, host)), self.device, self.pool)
        self.pool = self.pool or graph.pool()
        self.graphs[v] = graph
        seconds = time.perf_counter() - start
        self.capture_seconds += seconds
        log = logger.debug if startup else logger.info  # at first use a capture delays a step: worth a line
        log("captured a token graph for %d tokens, %d adapters%s in %.2f s (%d graphs, %.1f s in all)", b,
            v.lora.adapters, ", mixture" if v.lora.correction else "", seconds, len(self.graphs), self.capture_seconds)

    def _fill(self, embeds: torch.Tensor, batch: ForwardBatch, t: int, v: TokenVariant) -> None:
        a = batch.attn
        s = len(a.prefill_host)
        self.embeds[:t].copy_(embeds)
        self.positions[:, :t].copy_(batch.positions if batch.positions.dim() == 2 else batch.positions.expand(3, -1))
        self.slot_mapping[:t].copy_(a.slot_mapping)
        self.slot_mapping[t : v.tokens].fill_(self.pad_slot)
        if s:
            self.q_starts[:s].copy_(a.prefill_q_starts)
            self.q_lens[:s].copy_(a.prefill_q_lens)
            self.context_lens[:s].copy_(a.prefill_context_lens)
            self.block_tables[:s, : a.prefill_block_tables.shape[1]].copy_(a.prefill_block_tables)
        self.q_lens[s:].zero_()  # padding entries: no queries
        d = 0 if a.decode_rows is None else a.decode_block_tables.shape[0]
        if d:
            w = a.decode_block_tables.shape[1]
            self.decode_rows[:d].copy_(a.decode_rows)
            self.decode_context_lens[:d].copy_(a.decode_context_lens)
            self.decode_block_tables[:d, :w].copy_(a.decode_block_tables)
        self.decode_rows[d:].fill_(t)  # padding entries: no keys, their zeros go to the first padding row
        self.decode_context_lens[d:].zero_()

    def _static_batch(self, v: TokenVariant, host: tuple[tuple[int, int, int], ...]) -> ForwardBatch:
        """The variant's batch over the static buffers. `host` (the step's own prefills) is read only by the
        PyTorch attention path, which runs eagerly; the Triton kernels read the device tensors and the bucket."""
        b = v.tokens
        attn = AttentionMeta(
            slot_mapping=self.slot_mapping[:b], block_size=self.block_size, prefill_q_starts=self.q_starts,
            prefill_q_lens=self.q_lens, prefill_context_lens=self.context_lens, prefill_block_tables=self.block_tables,
            prefill_host=host, prefill_max_q_len=b, decode_rows=self.decode_rows,
            decode_context_lens=self.decode_context_lens, decode_block_tables=self.decode_block_tables,
            decode_max_context=self.decode_block_tables.shape[1] * self.block_size,
        )
        return ForwardBatch(input_ids=self.input_ids[:b], positions=self.positions[:, :b], attn=attn,
                            logits_rows=self.input_ids[:0], lora=self.lora.batch(b, v.lora))
