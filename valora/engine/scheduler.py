"""Continuous batching: every step decodes all running sequences and admits waiting ones (whole prompts) in
the same batch, within a token budget, the KV blocks left and the adapter slots. When blocks run out, the
newest running sequence is preempted and later recomputed, so nothing already accepted is lost."""

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
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager, max_batched_tokens: int,
                 max_loras: int | None) -> None:
        self.config, self.blocks = config, blocks
        self.max_batched_tokens = max_batched_tokens
        self.max_loras = max_loras
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

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
        """Decode every running sequence the decision does not pause, then admit waiting ones in the decision's
        order. The merged (hot) adapter always counts against the adapter slots. Sequences that are not `ready`
        (their adapter is still loading) sit the step out without holding anyone else up."""
        decision = decision or Decision()
        ready = ready or (lambda seq: True)
        out = SchedulerOutput()
        budget = self.max_batched_tokens
        for seq in list(self.running):  # oldest first; victims come from the newest end
            if seq not in self.running or seq in decision.paused or not ready(seq):
                continue
            while not self.blocks.can_grow(seq) and self.running[-1] is not seq:
                self._preempt(self.running.pop(), out)
            if not self.blocks.can_grow(seq):  # alone and still no room: wait for blocks to free up
                self._preempt(self.running.pop(), out)
                break
            self.blocks.grow(seq)
            out.seqs.append(seq)
            budget -= len(seq) - seq.num_computed
        if out.preempted:
            return out
        adapters = {s.lora_name for s in out.seqs if s.lora_name is not None}
        if decision.hot is not None:
            adapters.add(decision.hot)
        order = list(self.waiting) if decision.admit_order is None else decision.admit_order
        for seq in order:
            if len(self.running) >= self.config.max_num_seqs:
                break
            need = len(seq) - seq.num_computed
            if need > budget or not self.blocks.can_grow(seq):
                break
            if not ready(seq):
                continue
            if (self.max_loras is not None and seq.lora_name is not None and seq.lora_name not in adapters
                    and len(adapters) >= self.max_loras):
                continue  # its adapter would need a slot this step does not have; keep scanning
            self.waiting.remove(seq)
            self.blocks.grow(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            budget -= need
            if seq.lora_name is not None:
                adapters.add(seq.lora_name)
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.blocks.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
