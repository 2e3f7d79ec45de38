"""Continuous batching: every step decodes the running sequences first, then continues prompts already being
prefilled, then admits waiting ones, all within a token budget, the KV blocks left and the adapter slots.

With chunked prefill a prompt (its image tokens included) is split across steps to fit what the budget leaves, so a
burst of long or image-heavy prompts delays the running streams by at most one step's budget; without it a prompt
is admitted only whole. With prefix caching an admitted sequence starts from the longest run of cached blocks of its
prefix (same tokens, images and adapter registration). When blocks run out, the newest running sequence is
preempted and later recomputed, so nothing already accepted is lost.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from valora.config import SchedulerConfig
from valora.engine.block_manager import BlockManager
from valora.engine.sequence import Sequence, SequenceStatus
from valora.orchestrator.policy import Decision


@dataclass
class SchedulerOutput:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # per sequence: tokens it computes this step
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def drop(self, seq: Sequence) -> int:
        """Take `seq` back out of the step; returns the tokens it had."""
        i = self.seqs.index(seq)
        del self.seqs[i]
        return self.num_tokens.pop(i)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_batched_tokens: int,
                 max_loras: int | None) -> None:
        self.config, self.blocks = config, blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_loras = max_loras
        self.chunked = config.enable_chunked_prefill
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
        adapters = {decision.hot} if decision.hot is not None else set()
        runnable = [s for s in self.running if s not in decision.paused and ready(s)]
        runnable.sort(key=lambda s: len(s) - s.num_computed > 1)  # decodes first; otherwise oldest first
        for seq in runnable:
            if seq not in self.running:  # preempted for an older one
                continue
            n = min(len(seq) - seq.num_computed, budget)
            if n <= 0 or not self._has_slot(seq, adapters):
                continue  # a prompt in progress waits for budget; an adapter over the slots for the next step
            end = seq.num_computed + n
            while not self.blocks.can_allocate(seq, end) and self.running[-1] is not seq:  # victims: the newest
                victim = self.running.pop()
                if victim in out.seqs:
                    budget += out.drop(victim)
                self._preempt(victim, out)
            if not self.blocks.can_allocate(seq, end):  # alone and still no room: wait for blocks to free up
                self._preempt(self.running.pop(), out)
                break
            self.blocks.allocate(seq, end)
            out.add(seq, n)
            budget -= n
            if seq.lora_name is not None:
                adapters.add(seq.lora_name)
        if out.preempted:
            return out
        order = list(self.waiting) if decision.admit_order is None else decision.admit_order
        for seq in order:
            if len(self.running) >= self.config.max_num_seqs or budget <= 0:
                break
            if not ready(seq) or not self._has_slot(seq, adapters):
                continue  # its adapter is loading, or would need a slot this step does not have: keep scanning
            prefix = self.blocks.cached_prefix(seq)
            cached = len(prefix) * self.blocks.block_size
            need = len(seq) - cached
            n = min(need, budget) if self.chunked else need
            if n > budget or not self.blocks.can_allocate(seq, cached + n, prefix):
                break
            self.waiting.remove(seq)
            self.blocks.allocate(seq, cached + n, prefix)
            seq.num_computed = cached
            if self.blocks.enable_caching:
                self.prefix_queries += len(seq)
                self.prefix_hits += cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.add(seq, n)
            budget -= n
            if seq.lora_name is not None:
                adapters.add(seq.lora_name)
        return out

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
