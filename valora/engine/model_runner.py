"""Turns a scheduled step into one `ForwardBatch`, runs the model on it, and samples one token per sequence.

The batch is made on the host first (`StepInputs`: token ids, positions, attention ints, adapter slots, image rows)
and copied to the device in a few copies. Under tensor parallelism the same `StepInputs` go to every other rank
(`replicas`), which builds the same batch and runs its share of the model in step; this rank alone runs the vision
pass and samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import numpy as np
import torch

from valora.distributed.state import Followers
from valora.engine.block_manager import BlockManager
from valora.engine.sampler import sample_async
from valora.engine.sequence import PENDING, Sequence
from valora.engine.startup import StartupPhases
from valora.heads.params import HeadParams
from valora.models.forward_batch import ForwardBatch, ImageInputs
from valora.models.layers.aligned import ALIGN_BYTES
from valora.models.layers.attention import AttentionMeta
from valora.models.layers.parallel import kv_heads_per_rank
from valora.models.layers.uploads import upload
from valora.multimodal.cache import EmbeddingCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunInfo:
    """How the last launched step ran, for its step record: the policy's cost model learns from it."""

    graph: bool = False  # replayed from a CUDA graph
    decode: bool = False  # every sequence decoded one token
    image_tokens: int = 0  # image tokens the vision tower encoded (cached embeddings excluded)
    capture_s: float = 0.0  # CUDA graphs captured for it


ALIGN_INTS = ALIGN_BYTES // 4  # int32s in 16 bytes: the pointer alignment Triton specialises its kernels on


def segment_offsets(sizes: list[int]) -> list[int]:
    """Where each segment of a step's packed attention ints starts, each at a multiple of 16 bytes, then the total.
    Packed end to end, a view's alignment would follow the step's sizes (tokens, decodes, prefills), and Triton
    builds a kernel variant per combination of its pointer arguments' alignments (four for the prefill kernel):
    an eager step could meet a new combination at first use, long after start-up, and wait for its compile
    (0.5-2 s). Aligned, one variant serves every step, as with LoRAMeta's maps."""
    offsets, o = [], 0
    for n in sizes:
        offsets.append(o)
        o += -(-n // ALIGN_INTS) * ALIGN_INTS
    return offsets + [o]


@dataclass
class StepInputs:
    """One step's batch on the host, before its copies to the device."""

    input_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [3, T] int64
    attn_ints: np.ndarray  # int32: slot mapping, decode rows, prefill spans, decode lengths, block tables
    attn_sizes: list[int]
    prefills: list[tuple[int, int, int]]  # (q_start, q_len, context_len)
    prefill_width: int
    decode_width: int
    logits_rows: list[int]
    lora_slots: list[int]
    merged_slot: int | None
    image_rows: list[int] | None  # rows that take image embeddings

    def to_device(self, device: torch.device, block_size: int) -> ForwardBatch:
        """The batch, without its images' data (only the rows that take them: see `ModelRunner.prepare`). Copied
        through pinned memory without waiting for the device (layers/uploads.py): preparing step n+1 must not
        stall on step n's kernels."""
        return ForwardBatch(
            input_ids=upload(self.input_ids, device),
            positions=upload(self.positions, device),
            attn=self._attention_meta(device, block_size),
            logits_rows=upload(np.asarray(self.logits_rows, dtype=np.int64), device),
            images=None if self.image_rows is None else ImageInputs(
                [], [], [], self.merged_slot, upload(np.asarray(self.image_rows, dtype=np.int64), device), [], []),
            lora_slots=self.lora_slots,
            merged_slot=self.merged_slot,
        )

    def _attention_meta(self, device: torch.device, block_size: int) -> AttentionMeta:
        """All of the step's attention ints go to the device in one int32 copy; the fields are views of it, each
        starting 16-byte aligned (`segment_offsets`)."""
        sp, bd = len(self.prefills), self.attn_sizes[1]
        dev = upload(self.attn_ints, device)
        offsets = segment_offsets(self.attn_sizes)
        slot_map, rows, q_starts, q_lens, ctx, d_ctx, p_tab, d_tab = (
            dev[o : o + n] for o, n in zip(offsets, self.attn_sizes))
        attn = AttentionMeta(slot_map.long(), block_size)
        if sp:
            attn.prefill_q_starts, attn.prefill_q_lens, attn.prefill_context_lens = q_starts, q_lens, ctx
            attn.prefill_block_tables = p_tab.view(sp, self.prefill_width)
            attn.prefill_host = tuple(self.prefills)
            attn.prefill_max_q_len = max(q for _, q, _ in self.prefills)
        if bd:
            attn.decode_rows = rows.long()
            attn.decode_context_lens = d_ctx
            attn.decode_block_tables = d_tab.view(bd, self.decode_width)
            attn.decode_max_context = int(self.attn_ints[offsets[5] : offsets[5] + bd].max())
        return attn


class ModelRunner:
    def __init__(self, model: torch.nn.Module, blocks: BlockManager, dtype: torch.dtype, device: torch.device,
                 embed_cache: EmbeddingCache | None = None, max_blocks_per_seq: int | None = None,
                 replicas: Followers | None = None, name: str = "main") -> None:
        self.model, self.blocks, self.dtype, self.device = model, blocks, dtype, device
        self.replicas, self.name = replicas, name
        if replicas is not None:  # the other ranks make the same runner: their share of the same KV cache
            replicas.call("make_runner", name, blocks.num_blocks, blocks.block_size, max_blocks_per_seq)
        # Width of the decode block tables: a constant (e.g. ceil(max_model_len / block_size)) gives every decode
        # batch of one size the same tensor shapes; None sizes them to the longest sequence of the step.
        self.max_blocks_per_seq = max_blocks_per_seq
        self.embed_cache = embed_cache
        self.graphs = None  # CUDAGraphRunner, once `enable_cuda_graphs` ran
        self.token_graphs = None  # TokenGraphs, likewise
        self.last_run = RunInfo()
        # The last launched step's sampled tokens on the device, by sequence (tensor, row): a step launched before
        # they reach the host reads its sequences' PENDING input tokens from there.
        self.sampled: dict[Sequence, tuple[torch.Tensor, int]] = {}
        self._deferred: Callable[[], None] | None = None  # the sampler of a step launched with defer_sampling
        c = model.decoder_config
        # One block more than the block manager hands out: padding rows of a graph batch write their K/V there.
        self.pad_slot = blocks.num_blocks * blocks.block_size
        shape = (self.pad_slot + blocks.block_size, kv_heads_per_rank(c.num_kv_heads), c.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(c.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_block(model: torch.nn.Module, block_size: int, dtype: torch.dtype) -> int:
        c = model.decoder_config
        kv = kv_heads_per_rank(c.num_kv_heads)
        return 2 * c.num_layers * block_size * kv * c.head_dim * torch.empty((), dtype=dtype).element_size()

    def prepare(
        self, seqs: Seq[Sequence], num_tokens: Seq[int], lora_slots: dict[str, int], merged_slot: int | None = None
    ) -> tuple[ForwardBatch, list[tuple[Sequence, int]], StepInputs]:
        """The batch of the next `num_tokens[i]` tokens of each sequence (its LoRA work not built yet: see
        `forward`), for each of its images the (sequence, image index) that owns it, and the batch's host form.
        Only sequences whose last token is in the batch get a logits row: a chunk that ends inside a prompt samples
        nothing. A sequence's last token may be PENDING (sampled by the step still in flight, asynchronous
        scheduling): its input id is copied from that step's sampler output on the device."""
        ids: list[int] = []
        pos_chunks: list[torch.Tensor | int] = []  # a generated token's position is one int on every axis
        slot_mapping: list[int] = []
        prefills: list[tuple[int, int, int]] = []  # (q_start, q_len, context_len)
        pre_tables: list[list[int]] = []
        dec_rows: list[int] = []
        dec_lens: list[int] = []
        dec_tables: list[list[int]] = []
        bs = self.blocks.block_size
        logits_rows: list[int] = []
        lora_ids: list[int] = []
        img_data, img_tokens, img_slots, img_rows, img_spans, img_cached, img_owner = [], [], [], [], [], [], []
        img_keys = []
        pending: list[tuple[int, Sequence]] = []  # (row, sequence) of input tokens still on the device
        for seq, n in zip(seqs, num_tokens):
            start, end = seq.num_computed, seq.num_computed + n
            row0 = len(ids)
            ids.extend(seq.token_range(start, end))
            if ids[-1] == PENDING:
                pending.append((len(ids) - 1, seq))
            p = seq.prompt
            if n == 1 and start >= seq.prompt_len:
                pos_chunks.append(start + (p.position_delta if p.positions is not None else 0))
            else:
                pos_chunks.append(self._positions(seq, start, end))
            table = seq.block_table[: -(-end // bs)]
            slot_mapping.extend(table[i // bs] * bs + i % bs for i in range(start, end))
            if n == 1 and start > 0:
                dec_rows.append(row0)
                dec_lens.append(end)
                dec_tables.append(table)
            else:
                prefills.append((row0, n, end))
                pre_tables.append(table)
            if end == len(seq):
                logits_rows.append(row0 + n - 1)
            slot = lora_slots.get(seq.lora_name, -1) if seq.lora_name is not None else -1
            lora_ids.extend([slot] * n)
            vision_slot = slot if seq.vision_tag is not None else -1  # an LM-only adapter leaves images alone
            for k, item in enumerate(seq.prompt.images):
                lo, hi = max(item.offset, start), min(item.offset + item.num_tokens, end)
                if lo >= hi:  # not in this step's tokens
                    continue
                cached = seq.cached_embeds(k, self.embed_cache)  # None: encoded this step (the scheduler charged it)
                img_data.append(item.data)
                img_tokens.append(item.num_tokens)
                img_slots.append(vision_slot)
                img_rows.extend(range(row0 + lo - start, row0 + hi - start))
                img_spans.append((lo - item.offset, hi - item.offset))
                img_cached.append(cached)
                img_owner.append((seq, k))
                img_keys.append(seq.image_key(k))
        inputs = StepInputs(np.asarray(ids, dtype=np.int64), self._positions_array(pos_chunks, len(ids)),
                            *self._attention_ints(slot_mapping, prefills, pre_tables, dec_rows, dec_lens, dec_tables),
                            logits_rows, lora_ids, merged_slot, img_rows if img_data else None)
        batch = inputs.to_device(self.device, self.blocks.block_size)
        if pending or PENDING in ids:
            self._gather_pending(batch.input_ids, pending, ids.count(PENDING))
        if batch.images is not None:
            batch.images = ImageInputs(img_data, img_tokens, img_slots, merged_slot, batch.images.token_rows,
                                       img_cached, img_spans, img_keys)
        return batch, img_owner, inputs

    def _gather_pending(self, input_ids: torch.Tensor, pending: list[tuple[int, Sequence]], count: int) -> None:
        """PENDING input ids (each a sequence's last token) from the in-flight step's sampled tokens, on the device."""
        if len(pending) != count:
            raise RuntimeError("a PENDING token inside a sequence: only its last token may be in flight")
        sources = [self.sampled[seq] for _, seq in pending]
        tokens = sources[0][0]
        if any(t is not tokens for t, _ in sources):
            raise RuntimeError("PENDING tokens from more than one step in flight")
        rows = upload(np.asarray([[r for r, _ in pending], [i for _, i in sources]], dtype=np.int64), self.device)
        input_ids.index_copy_(0, rows[0], tokens.index_select(0, rows[1]))

    def _attention_ints(self, slot_mapping: list[int], prefills: list[tuple[int, int, int]],
                        pre_tables: list[list[int]], dec_rows: list[int], dec_lens: list[int],
                        dec_tables: list[list[int]]) -> tuple[np.ndarray, list[int], list, int, int]:
        """The step's attention ints packed for one copy: (ints, their split sizes, prefills, table widths)."""
        t, sp, bd = len(slot_mapping), len(prefills), len(dec_rows)
        wp = max((len(b) for b in pre_tables), default=0)
        wd = max(max((len(b) for b in dec_tables), default=0), self.max_blocks_per_seq or 0)
        sizes = [t, bd, sp, sp, sp, bd, sp * wp, bd * wd]
        offsets = segment_offsets(sizes)
        buf = np.zeros(offsets[-1], dtype=np.int32)
        spans = (slot_mapping, dec_rows, *(zip(*prefills) if sp else ((), (), ())), dec_lens)
        for o, values in zip(offsets, spans):
            buf[o : o + len(values)] = values
        for tables, w, o in ((pre_tables, wp, offsets[6]), (dec_tables, wd, offsets[7])):
            for b in tables:
                buf[o : o + len(b)] = b
                o += w
        return buf, sizes, prefills, wp, wd

    @staticmethod
    def _positions_array(chunks: list[torch.Tensor | int], num_tokens: int) -> np.ndarray:
        """[3, T] positions, for one copy."""
        pos = np.empty((3, num_tokens), dtype=np.int64)
        col = 0
        for c in chunks:
            if isinstance(c, int):
                pos[:, col] = c
                col += 1
            else:
                pos[:, col : col + c.shape[1]] = c.numpy()
                col += c.shape[1]
        return pos

    @staticmethod
    def _positions(seq: Sequence, start: int, end: int) -> torch.Tensor:
        """[3, end - start] positions; prompt tokens take the processor's (M-RoPE) positions."""
        p = seq.prompt
        if p.positions is None:
            return torch.arange(start, end).expand(3, -1)
        head = p.positions[:, start : min(end, seq.prompt_len)]
        if end <= seq.prompt_len:  # a chunk inside the prompt
            return head
        tail_start = max(start, seq.prompt_len)
        tail = torch.arange(tail_start + p.position_delta, end + p.position_delta).expand(3, -1)
        return torch.cat([head, tail], dim=1)

    def enable_cuda_graphs(self, max_num_seqs: int, max_loras: int, capture: bool = True,
                           max_num_batched_tokens: int = 2048, phases: StartupPhases | None = None) -> None:
        """Run decode steps on padded static batches, replayed from CUDA graphs or, with `capture=False`, eagerly
        with the same numerics; steps with prefill work, alone or mixed with decodes, up to the token budget
        (engine/token_graphs.py), and vision passes (models/vision_graphs.py) likewise, per bucket. First the LoRA
        kernels of every batch layout are built (engine/kernel_warmup.py), then the common decode and token-bucket
        graphs captured, each within its start-up budget; the rest are captured at first use. `phases` times
        each of the three."""
        from valora.engine.cuda_graphs import CUDAGraphRunner
        from valora.engine.kernel_warmup import compile_lora_kernels, eager_sizes
        from valora.engine.token_graphs import DEFAULT_MAX_TOKENS, TokenGraphs
        from valora.models.vision_graphs import VisionGraphs

        if self.replicas is not None:  # every rank captures the same graphs, in the same order (collectives inside)
            self.replicas.call("enable_cuda_graphs", self.name, max_num_seqs, max_loras, capture,
                               max_num_batched_tokens)
        self.model.vision_graphs = VisionGraphs(self.model, capture=capture)
        if self.max_blocks_per_seq is None:
            raise ValueError("CUDA graphs need a fixed block-table width (max_blocks_per_seq)")
        self.graphs = CUDAGraphRunner(
            self.model, self.kv_caches, max_num_seqs=max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq,
            block_size=self.blocks.block_size, pad_slot=self.pad_slot, max_loras=max_loras, device=self.device,
            capture=capture)
        self.token_graphs = TokenGraphs(
            self.model, self.kv_caches, max_num_seqs=max_num_seqs, max_blocks_per_seq=self.max_blocks_per_seq,
            block_size=self.blocks.block_size, pad_slot=self.pad_slot, max_loras=max_loras, device=self.device,
            capture=capture, max_tokens=min(max_num_batched_tokens, DEFAULT_MAX_TOKENS))
        phases = phases or StartupPhases(self.device)
        with phases.phase("kernel_builds"):
            compile_lora_kernels(self.model, self.graphs.lora_metas() + self.token_graphs.lora_metas(),
                                 eager_sizes(max_num_batched_tokens, max_loras), self.device)
        with phases.phase("decode_graphs"):
            self.graphs.capture_common()
        with phases.phase("token_graphs"):
            self.token_graphs.capture_common()

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Final hidden states of every row: replayed from a CUDA graph when the step is a plain decode step, or a
        step with prefill work within the token buckets (its embeddings computed first). Records how it ran in
        `last_run`."""
        decode = self.graphs is not None and self.graphs.usable(batch)
        tokens = not decode and self.token_graphs is not None and self.token_graphs.usable(batch)
        images = batch.images
        encoded = 0 if images is None else sum(images.num_tokens[g[0]] for g in images.to_encode())
        captured = self.capture_seconds()
        if decode:  # with `--enforce-eager` the same static batches, run eagerly (prefills likewise)
            out = self.graphs.run(batch)
        elif tokens:
            out = self.token_graphs.run(self.model.embed(batch), batch)
        else:
            batch.build_lora()
            out = self.model(batch, self.kv_caches)
        graph = (decode and self.graphs.capture) or (tokens and self.token_graphs.capture)
        self.last_run = RunInfo(graph, decode or not batch.attn.prefill_host, encoded,
                                self.capture_seconds() - captured)
        return out

    def capture_seconds(self) -> float:
        """Seconds spent capturing CUDA graphs so far: decode, token-bucket and vision."""
        vision = getattr(self.model, "vision_graphs", None)
        return sum(g.capture_seconds for g in (self.graphs, self.token_graphs, vision) if g is not None)

    def logits(self, last: torch.Tensor, rows: list[int] | None) -> torch.Tensor | None:
        """Logits of rows `rows` of the final hidden states (every row for None, none for an empty list); under
        tensor parallelism every rank makes the same call (the LM head gathers the vocabulary)."""
        if rows is None:
            return self.model.compute_logits(last)
        if not rows:
            return None
        return self.model.compute_logits(last.index_select(0, upload(np.asarray(rows, dtype=np.int64), last.device)))

    def run(self, seqs: Seq[Sequence], num_tokens: Seq[int], lora_slots: dict[str, int], stop_ids: Seq[set[int]],
            merged_slot: int | None = None) -> list[int | torch.Tensor | None]:
        """Compute the next `num_tokens[i]` tokens of each sequence. A sequence whose last token was among them gets
        its next token, or, when a task head answers it (`HeadParams`), its final hidden state at the last prompt
        token (no logits are computed for it); one still inside its prompt (a chunk) gets None."""
        return self.launch(seqs, num_tokens, lora_slots, stop_ids, merged_slot)()

    @torch.inference_mode()
    def launch(self, seqs: Seq[Sequence], num_tokens: Seq[int], lora_slots: dict[str, int],
               stop_ids: Seq[set[int]], merged_slot: int | None = None, defer_sampling: bool = False
               ) -> Callable[[], list[int | torch.Tensor | None]]:
        """`run` split in two: the step's device work is queued now, the returned function waits for its results.
        The host can post-process the previous step meanwhile. With `defer_sampling` only the model's pass is
        queued: the sampler waits for `finish_sampling`, which the engine calls once the step before is collected
        and its tokens advanced the grammars that this step's masks come from; the pass runs meanwhile."""
        batch, image_owners, inputs = self.prepare(seqs, num_tokens, lora_slots, merged_slot)
        done = [i for i, (s, n) in enumerate(zip(seqs, num_tokens)) if s.num_computed + n == len(s)]  # rows of last
        sampled = [(row, i) for row, i in enumerate(done) if not isinstance(seqs[i].params, HeadParams)]
        rows = None if len(sampled) == len(seqs) else [row for row, _ in sampled]  # None: every row (the common step)
        if self.replicas is not None:
            self.replicas.call("step", self.name, inputs, rows)
        last = self.forward(batch).index_select(0, batch.logits_rows)
        if batch.images is not None:
            for (seq, k), emb, (_, end) in zip(image_owners, batch.images.cached, batch.images.spans):
                if seq.image_embeds[k] is None and self.embed_cache is not None:
                    self.embed_cache.put(seq.image_key(k), emb)
                # Kept while a later chunk still takes some of its rows, then dropped: device memory for the
                # sequence's whole decode otherwise (a 6-frame video at 7B shapes holds 11 MB). A preempted
                # sequence that recomputes its prompt finds it in the embedding cache or encodes it again.
                seq.image_embeds[k] = emb if end < seq.prompt.images[k].num_tokens else None
        logits = self.logits(last, rows)
        rows_of = [i for _, i in sampled]  # the sequences the sampler takes, in its row order
        pending: list = []

        def sample() -> None:
            if rows_of:
                p = sample_async(logits, [seqs[i] for i in rows_of], [stop_ids[i] for i in rows_of])
                self.sampled = {seqs[i]: (p.tokens, j) for j, i in enumerate(rows_of)}
                pending.append(p)
            else:
                self.sampled = {}
                pending.append(None)

        if defer_sampling:
            self._deferred = sample
        else:
            sample()
            if rows is None:  # the common step: its tokens are the sampler's result
                return pending[0].result

        @torch.inference_mode()
        def results() -> list[int | torch.Tensor | None]:
            if not pending:  # collected before the engine queued its sampler (never in the engine's own order)
                if self._deferred is sample:
                    self._deferred = None
                sample()
            out: list[int | torch.Tensor | None] = [None] * len(seqs)
            for row, i in enumerate(done):
                out[i] = last[row]
            for i, token in zip(rows_of, pending[0].result() if pending[0] is not None else []):
                out[i] = token
            return out

        return results

    @torch.inference_mode()
    def finish_sampling(self) -> None:
        """Queue the sampler of the step launched with `defer_sampling`, if it is still waiting."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            deferred()
