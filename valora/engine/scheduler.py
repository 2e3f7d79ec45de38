"""Continuous batching: every step decodes the running sequences first, then continues prompts already being
prefilled, then admits waiting ones, all within a token budget, the KV blocks left and the adapter slots.

With chunked prefill a prompt (its image tokens included) is split across steps to fit what the budget leaves, so a
burst of long or image-heavy prompts delays the running streams by at most one step's budget; without it a prompt
is admitted only whole. The first chunk that reaches an image runs the image's whole vision pass, so a second,
encoder budget (vLLM's encoder compute budget) bounds the image tokens a step encodes: a chunk ends before an image
that would exceed it (see `Scheduler`). With prefix caching an admitted sequence starts from the longest run of
cached blocks of its prefix (same tokens, images and adapter registration). When blocks run out, the newest running
sequence is preempted and later recomputed, so nothing already accepted is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from valora.config import SchedulerConfig
from valora.engine.block_manager import BlockManager
from valora.engine.sequence import Sequence, SequenceStatus
from valora.multimodal.cache import EmbeddingCache
from valora.orchestrator.policy import Decision


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # per sequence: tokens it computes this step
    encoder_tokens: list[int] = field(default_factory=list)  # per sequence: image tokens it encodes this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, n: int, encoder_tokens: int = 0) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)
        self.encoder_tokens.append(encoder_tokens)

    def drop(self, seq: Sequence) -> tuple[int, int]:
        """Take `seq` back out of the step; returns the tokens and the encoder tokens it had."""
        i = self.seqs.index(seq)
        del self.seqs[i]
        return self.num_tokens.pop(i), self.encoder_tokens.pop(i)


class Scheduler:
    """Each step spends two budgets: `max_batched_tokens`, the tokens the LM computes, and `max_encoder_tokens`
    (vLLM's encoder compute budget, `--max-num-encoder-input-tokens`), the image tokens whose embeddings the vision
    tower computes. An image is encoded whole in the step whose chunk first reaches its span (its embeddings are then
    kept until the prompt is done), so without the second budget a step of a few hundred tokens could start several
    images and run several full vision passes (~4.5 ms each for a 448x448 image in Qwen2-VL-7B on an H100, against
    a 6 ms decode step). A chunk [num_computed, end) that reaches images still to encode (`Sequence.needs_encoding`:
    not kept by an earlier chunk, not in the embedding cache) charges their tokens; one that would exceed what is
    left ends just before the first such image's span (the sequence waits a step if nothing is left of the chunk).
    A step with no encoder work yet always takes one image, so an image larger than the budget is never starved.

    The default budget is the token budget (vLLM's default): one knob then bounds a step's LM and vision work
    alike, in the same units. At the latency-oriented token budgets (256-512) that is one or two 256-token images
    per step, which is what bounds the running streams' inter-token tail during an image burst; at throughput-
    oriented ones (2048 and up) vision passes batch as before, so steady-state throughput is kept. Without chunked
    prefill there is no encoder budget unless one is set (whole prompts as before; with one, a prompt whose images
    do not fit waits, unless it is the step's first encoder work).

    With `encoder_in_token_budget` (chunked prefill only) an image's vision pass also charges the token budget, its
    LM tokens' worth (a 448x448 image's tower pass costs about as much as prefilling its 256 tokens), so a step
    either encodes or prefills up to the one budget, not both: at a 256-token budget a burst step with one image
    was 32 decodes + a 224-token chunk + the tower pass (13.5 ms against 6.2 ms steady on the H100), and becomes
    32 decodes + the image's tower pass + the few tokens that reach its span, the chunk following in the next step.
    A step whose prompts have taken nothing yet always takes one image, so an image is never starved; the price is
    about a step more of time to first token per image."""

    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_batched_tokens: int,
                 max_loras: int | None, max_encoder_tokens: int | None = None,
                 embed_cache: EmbeddingCache | None = None, max_prompt_seqs: int | None = None) -> None:
        self.config, self.blocks = config, blocks
        self.max_batched_tokens = max_batched_tokens
        # Sequences with prompt work in a step that also decodes, at most (None: any): the token-bucket CUDA graphs
        # take a step with up to that many. An image burst under an encoder budget admitted all 32 prompts in one
        # step, each for the few tokens before its image, and that step ran eagerly: 33 ms of host launches on the
        # H100, during which the running streams got nothing. The prompts past the cap start a step later (one
        # image's vision pass a step is all that budget allows anyway). A step with no decodes stalls no stream, so
        # it takes every prompt that fits, as one large eager step if need be (a batch of short prompts at start).
        self.max_prompt_seqs = max_prompt_seqs
        self.max_encoder_tokens = max_encoder_tokens  # None: no encoder budget
        self.embed_cache = embed_cache  # the runner's: images found there need no vision pass
        self.max_loras = max_loras
        self.chunked = config.enable_chunked_prefill
        self.encoder_in_token_budget = config.encoder_in_token_budget  # takes effect with chunking only
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_hits = 0  # of which found there

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished or aborted) and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)

    def schedule(self, decision: Decision | None = None,
                 ready: Callable[[Sequence], bool] | None = None) -> SchedulerOutput:
        """Running sequences the decision does not pause (decodes, then prompts in progress), then waiting ones in
        the decision's order. The merged (hot) adapter always counts against the adapter slots. Sequences that are
        not `ready` (their adapter is still loading) sit the step out without holding anyone else up."""
        decision = decision or Decision()
        ready = ready or (lambda seq: True)
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        encoded = 0  # encoder tokens this step has charged
        prefilling = False  # whether a prompt has taken tokens this step (decodes are no prompt work)
        prompts = decodes = 0  # sequences with prompt work in the step, and decoding ones
        adapters = self._adapters(decision, out)
        runnable = [s for s in self.running if s not in decision.paused and ready(s)]
        runnable.sort(key=lambda s: len(s) - s.num_computed > 1)  # decodes first; otherwise oldest first
        for seq in runnable:
            if seq not in self.running:  # preempted for an older one
                continue
            several = len(seq) - seq.num_computed > 1  # a prompt (or a recompute) in progress, not a decode
            if several and self._capped(prompts, decodes):
                continue  # it waits a step (decodes are sorted first, so none is held back)
            n = min(len(seq) - seq.num_computed, budget)
            enc = 0
            if n > 0:
                end, enc = self._encoder_cut(seq, seq.num_computed, seq.num_computed + n, encoded, budget, prefilling)
                n = end - seq.num_computed
            if n <= 0 or not self._has_slot(seq, adapters):
                continue  # a prompt in progress waits for budget; an adapter over the slots for the next step
            end = seq.num_computed + n
            while not self.blocks.can_allocate(seq, end) and self.running[-1] is not seq:  # victims: the newest
                victim = self.running.pop()
                if victim in out.seqs:  # a decode: the step's prompts are all older than `seq`, victims newer
                    tokens, victim_enc = out.drop(victim)
                    budget += tokens + self._charged(victim_enc)
                    encoded -= victim_enc
                    decodes -= 1
                    adapters = self._adapters(decision, out)  # its slot is free again for the rest of the step
                    prefilling = any(s.num_computed < s.prompt_len for s in out.seqs)
                self._preempt(victim, out)
            if not self.blocks.can_allocate(seq, end):  # alone and still no room: wait for blocks to free up
                self._preempt(self.running.pop(), out)
                break
            prefilling = prefilling or seq.num_computed < seq.prompt_len
            prompts += several
            decodes += not several
            self.blocks.allocate(seq, end)
            out.add(seq, n, enc)
            budget -= n + self._charged(enc)
            encoded += enc
            if seq.lora_name is not None:
                adapters.add(seq.lora_name)
        if out.preempted:
            return out
        order = list(self.waiting) if decision.admit_order is None else decision.admit_order
        for seq in order:
            if len(self.running) >= self.config.max_num_seqs or budget <= 0 or self._capped(prompts, decodes):
                break
            if not ready(seq) or not self._has_slot(seq, adapters):
                continue  # its adapter is loading, or would need a slot this step does not have: keep scanning
            prefix = self.blocks.cached_prefix(seq)
            cached = len(prefix) * self.blocks.block_size
            need = len(seq) - cached
            n = min(need, budget) if self.chunked else need
            end, enc = self._encoder_cut(seq, cached, cached + n, encoded, budget, prefilling, whole=not self.chunked)
            if end < cached + n and not self.chunked:
                break  # its images would exceed what is left of the encoder budget: whole, in a later step
            n = end - cached
            if n <= 0 or n > budget or not self.blocks.can_allocate(seq, cached + n, prefix):
                break
            self.waiting.remove(seq)
            self.blocks.allocate(seq, cached + n, prefix)
            seq.num_computed = cached
            if self.blocks.enable_caching:
                self.prefix_queries += len(seq)
                self.prefix_hits += cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, n, enc)
            budget -= n + self._charged(enc)
            encoded += enc
            prefilling = True
            prompts += 1
            if seq.lora_name is not None:
                adapters.add(seq.lora_name)
        return out

    @staticmethod
    def _adapters(decision: Decision, out: SchedulerOutput) -> set[str]:
        """The adapters a step holds slots for: its sequences' and the merged one."""
        held = {s.lora_name for s in out.seqs if s.lora_name is not None}
        return (held | {decision.hot}) if decision.hot is not None else held

    def _capped(self, prompts: int, decodes: int) -> bool:
        """Whether a step with `decodes` decoding sequences has as many with prompt work as it may."""
        return self.max_prompt_seqs is not None and decodes > 0 and prompts >= self.max_prompt_seqs

    def _charged(self, encoder_tokens: int) -> int:
        """What encoding `encoder_tokens` image tokens costs the token budget."""
        return encoder_tokens if self.encoder_in_token_budget and self.chunked else 0

    def _encoder_cut(self, seq: Sequence, start: int, end: int, encoded: int, budget: int, prefilling: bool,
                     whole: bool = False) -> tuple[int, int]:
        """Where the chunk [start, end) of `seq` ends within the encoder budget, and the image tokens it then
        encodes, the step having charged `encoded` so far and `budget` tokens left: it ends before the first image
        still to encode that would exceed the budget, unless that image is the step's first encoder work. A `whole`
        prompt (no chunking) either fits or ends at `start`; it always fits as the step's first encoder work. When
        images charge the token budget too, an image fits only with the chunk's tokens up to its span and every
        image before it within `budget`, the step's first one only if no prompt has taken tokens yet; the chunk then
        takes what the budget leaves, at least the one token into its last image's span that encodes it."""
        images = seq.prompt.images
        if not images or start >= seq.prompt_len:
            return end, 0
        shared = bool(self._charged(1))
        cost, reach = 0, start  # the images this chunk encodes so far, and the end that reaches the last of them
        for k, image in enumerate(images):  # in prompt order
            lo, hi = image.offset, image.offset + image.num_tokens
            if lo >= end:
                break
            if hi <= start or not seq.needs_encoding(k, self.embed_cache):
                continue
            n = image.num_tokens
            into = max(lo, start) + 1  # the chunk must reach this far to encode the image
            if shared:
                first = encoded == 0 and cost == 0 and not prefilling
                fits = into - start + cost + n <= budget
            else:
                first = encoded == 0 and (whole or cost == 0)  # the step's first encoder work always fits
                fits = True
            over = self.max_encoder_tokens is not None and encoded + cost + n > self.max_encoder_tokens
            if not first and (over or not fits):
                if whole:
                    return start, 0
                end = max(lo, start)  # just before it
                break
            cost += n
            reach = into
        if shared and cost:
            end = max(min(end, start + budget - cost), reach)
        return end, cost

    def _has_slot(self, seq: Sequence, adapters: set[str]) -> bool:
        """Whether `seq`'s adapter is among this step's or one more still fits in the adapter slots."""
        return (self.max_loras is None or seq.lora_name is None or seq.lora_name in adapters
                or len(adapters) < self.max_loras)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
