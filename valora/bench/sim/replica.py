"""One GPU as the simulator sees it: the engine's continuous batching and its two adapter tiers, charged by
`StepCosts` instead of run.

The scheduling mirrors `valora/engine/scheduler.py` in unmerged mode: every step decodes all running sequences
and admits waiting ones in arrival order within the token budget, `max_num_seqs`, and `max_loras` distinct
adapters; a request whose adapter is not in a GPU slot yet sits out without holding the queue up. The adapter
tiers mirror `valora/lora/manager.py`: `max_loras` GPU slots as an LRU over a host cache of `max_cpu_loras`;
slots are filled for the requests in line (never evicting an adapter a running or earlier request needs), from
the host cache at PCIe speed or from disk through one loader thread, off the step loop. The KV cache is not
modelled: the configurations simulated here never fill an H100's.
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

from valora.bench.sim.costs import StepCosts


@dataclass(frozen=True)
class ReplicaConfig:
    """The engine flags that shape a step (defaults: the measured sweep's `valora serve` flags)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_loras: int = 16
    max_cpu_loras: int = 16


@dataclass
class SimRequest:
    """A request as the simulator follows it; times in seconds from the start."""

    index: int
    arrival_s: float
    warmup: bool
    task: str
    adapter: str
    adapter_bytes: int
    prompt_tokens: int
    images: int
    output_tokens: int
    replica: int | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    adapter_was_resident: bool | None = None  # its adapter was in, or on its way to, a slot of its replica
    schedulable_from_step: int = 0


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    running_s: float = 0.0  # sequences in a step times its duration, summed: running_s / busy_s is the mean batch
    tokens: int = 0  # one per sequence per step
    served: int = 0
    slot_loads: list[float] = field(default_factory=list)  # when each slot load started
    disk_loads: list[float] = field(default_factory=list)


class Replica:
    """Call `enqueue` when a request arrives, `start_step` when the replica is idle, `finish_step` at the end of
    the step it returned; `next_ready_s` says when a waiting request's adapter becomes usable."""

    def __init__(self, index: int, config: ReplicaConfig, costs: StepCosts) -> None:
        self.index, self.config, self.costs = index, config, costs
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[int, SimRequest] = {}
        self._done_at: list[tuple[int, int]] = []  # (step count at which it has all its tokens, request index)
        self._adapters_running: Counter[str] = Counter()
        self.slots: OrderedDict[str, float] = OrderedDict()  # adapter -> time its copy into the slot completes
        self.host: OrderedDict[str, None] = OrderedDict()
        self._loader_free_s = 0.0
        self.step_count = 0
        self.busy = False
        self._step: tuple[list[SimRequest], float, int] | None = None
        self.stats = ReplicaStats()

    @property
    def outstanding(self) -> int:
        """Requests routed here and not finished: what a least-loaded router balances."""
        return len(self.waiting) + len(self.running)

    def holds(self, adapter: str) -> bool:
        """Whether the adapter is in a GPU slot or on its way into one (what a replica reports as loaded)."""
        return adapter in self.slots

    def enqueue(self, req: SimRequest, now: float) -> None:
        """A request reaches the engine between steps: while a step runs, the next one has already been scheduled
        (the engine launches step n+1 before it returns step n's outputs), so it can join the one after."""
        req.replica = self.index
        req.schedulable_from_step = self.step_count + (2 if self.busy else 0)
        req.adapter_was_resident = self.holds(req.adapter)
        self.waiting.append(req)
        self._fill_slots(now)

    def _fill_slots(self, now: float) -> None:
        """Claim slots for the adapters of the requests in line, in order, as the engine's prefetch does."""
        needed: set[str] = set(self._adapters_running)
        for req in self.waiting:
            if len(needed) >= self.config.max_loras:
                break
            name = req.adapter
            if name in needed:
                continue
            needed.add(name)
            if name in self.slots:
                self.slots.move_to_end(name)
                continue
            if len(self.slots) >= self.config.max_loras:
                victim = next((a for a in self.slots if a not in needed and self.slots[a] <= now), None)
                if victim is None:
                    break  # every slot is needed ahead of this request
                del self.slots[victim]
            self.slots[name] = self._load(req, now)

    def _load(self, req: SimRequest, now: float) -> float:
        """Time the adapter is usable in its slot: from the host cache, or read from disk by the loader first."""
        self.stats.slot_loads.append(now)
        start = now
        if req.adapter in self.host:
            self.host.move_to_end(req.adapter)
        else:
            self.stats.disk_loads.append(now)
            start = max(now, self._loader_free_s) + self.costs.load_ms(req.adapter_bytes, from_disk=True) / 1e3
            self._loader_free_s = start
            self.host[req.adapter] = None
            while len(self.host) > self.config.max_cpu_loras:
                self.host.popitem(last=False)
        return start + self.costs.load_ms(req.adapter_bytes, from_disk=False) / 1e3

    def next_ready_s(self, now: float) -> float | None:
        """The earliest time a waiting request's adapter finishes loading (None if none is loading)."""
        pending = [t for a, t in self.slots.items() if t > now]
        return min(pending) if pending else None

    def start_step(self, now: float) -> float | None:
        """Schedule one step at `now`; its duration in seconds, or None if there is nothing to run yet."""
        cfg = self.config
        self._fill_slots(now)
        decoding = len(self.running)
        adapters = set(self._adapters_running)
        budget = cfg.max_num_batched_tokens - decoding
        admitted: list[SimRequest] = []
        for req in list(self.waiting):
            if decoding + len(admitted) >= cfg.max_num_seqs or req.prompt_tokens > budget:
                break
            if req.schedulable_from_step > self.step_count:
                continue  # not in the engine yet
            if self.slots.get(req.adapter, float("inf")) > now:
                continue  # its adapter is not in a slot yet
            if req.adapter not in adapters and len(adapters) >= cfg.max_loras:
                continue
            self.waiting.remove(req)
            admitted.append(req)
            adapters.add(req.adapter)
            budget -= req.prompt_tokens
        if not decoding and not admitted:
            return None
        ms = self.costs.step_ms(decoding, len(self._adapters_running), sum(r.prompt_tokens for r in admitted),
                                sum(r.images for r in admitted), len(self.waiting) + len(admitted))
        for req in admitted:  # from now on their adapters are in use: no slot load may evict them
            self._adapters_running[req.adapter] += 1
        self._step = (admitted, now, decoding + len(admitted))
        self.busy = True
        return ms / 1e3

    def finish_step(self, now: float) -> list[SimRequest]:
        """Apply the step that ends at `now`: one token for every sequence in it; the finished requests."""
        admitted, started, batch = self._step
        self._step = None
        self.busy = False
        self.step_count += 1
        self.stats.steps += 1
        self.stats.busy_s += now - started
        self.stats.running_s += batch * (now - started)
        self.stats.tokens += batch
        for req in admitted:  # the prefill makes the first token
            req.first_token_s = now
            self.running[req.index] = req
            heapq.heappush(self._done_at, (self.step_count + req.output_tokens - 1, req.index))
        finished = []
        while self._done_at and self._done_at[0][0] <= self.step_count:
            _, index = heapq.heappop(self._done_at)
            req = self.running.pop(index)
            req.finished_s = now
            self._adapters_running[req.adapter] -= 1
            if not self._adapters_running[req.adapter]:
                del self._adapters_running[req.adapter]
            if req.adapter in self.slots:
                self.slots.move_to_end(req.adapter)
            finished.append(req)
        self.stats.served += len(finished)
        return finished
