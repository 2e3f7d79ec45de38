"""N simulated GPUs behind a router, replaying a workload: a discrete-event loop over arrivals, step ends and
adapter loads finishing.

A cluster of N GPUs serves N times the users of one: its requests are N independent windows of the trace, each
at 1/N of the rate (seeds `seed`, `seed + 1`, ...), with Zipf adapters drawn over `adapters_per_gpu x N`
adapters. Window 0 of a one-GPU run is exactly the request list of the measured sweep point with the same seed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from valora.bench.client import Record
from valora.bench.sim.costs import ModelShape, StepCosts
from valora.bench.sim.replica import Replica, ReplicaConfig, SimRequest
from valora.bench.sim.routing import Router
from valora.bench.workload import Skew, Workload


@dataclass(frozen=True)
class PromptModel:
    """Prompt tokens as the server counts them: the chat template, the words, and each image's visual tokens
    (256 for a 448x448 image on Qwen2-VL). `template_tokens` and `tokens_per_word` are fitted on a sweep's
    records (`calibrate.fit_prompt_model`)."""

    template_tokens: float = 56.0
    tokens_per_word: float = 1.19
    image_tokens: int = 256

    def tokens(self, words: int, images: int) -> int:
        return round(self.template_tokens + self.tokens_per_word * words) + self.image_tokens * images


@dataclass(frozen=True)
class ClusterWorkload:
    """What the cluster is offered: the bench's workload definitions, scaled to N GPUs as described above."""

    mix: str = "vqa"
    skew: str = "zipf:1.0"
    adapters_per_gpu: int = 16
    ranks: tuple[int, ...] = (64, 32, 16, 8)  # adapter i has rank ranks[i % len(ranks)], as in the sweep
    duration_s: float = 45.0
    warmup_s: float = 10.0
    seed: int = 0

    def adapters(self, gpus: int) -> tuple[str, ...]:
        return tuple(f"lora{i:02d}" for i in range(self.adapters_per_gpu * gpus))

    def windows(self, gpus: int, rate: float) -> list[Workload]:
        """The bench workloads whose requests together make the cluster's, one per GPU."""
        return [Workload(self.mix, rate / gpus, self.duration_s, self.adapters(gpus), warmup_s=self.warmup_s,
                         skew=Skew.parse(self.skew), seed=self.seed + k) for k in range(gpus)]

    def requests(self, gpus: int, rate: float, prompts: PromptModel, shape: ModelShape) -> list[SimRequest]:
        names = self.adapters(gpus)
        nbytes = {name: shape.adapter_bytes(self.ranks[i % len(self.ranks)]) for i, name in enumerate(names)}
        out = []
        for w in self.windows(gpus, rate):
            for r in w.requests():
                out.append(SimRequest(
                    index=0, arrival_s=r.arrival_s, warmup=r.warmup, task=r.task, adapter=r.adapter,
                    adapter_bytes=nbytes[r.adapter], prompt_tokens=prompts.tokens(len(r.prompt.split()), len(r.images)),
                    images=len(r.images), output_tokens=r.output_tokens))
        out.sort(key=lambda r: r.arrival_s)
        for i, r in enumerate(out):
            r.index = i
        return out


@dataclass
class ClusterResult:
    requests: list[SimRequest]
    replicas: list[Replica]

    def records(self) -> list[Record]:
        """The requests as the bench client would have recorded them, for `valora.bench.summary`."""
        return [Record(
            index=r.index, task=r.task, adapter=r.adapter, warmup=r.warmup, images=r.images,
            expected_output_tokens=r.output_tokens, scheduled_s=r.arrival_s,
            status="ok" if r.finished_s is not None else "timeout", sent_s=r.arrival_s,
            first_token_s=r.first_token_s, finished_s=r.finished_s, prompt_tokens=r.prompt_tokens,
            output_tokens=r.output_tokens if r.finished_s is not None else None) for r in self.requests]


_STEP_END, _ARRIVAL, _WAKE = 0, 1, 2


def simulate(requests: list[SimRequest], gpus: int, router: Router, costs: StepCosts, config: ReplicaConfig,
             until_s: float) -> ClusterResult:
    """Replay `requests` on `gpus` replicas until every one finishes or the clock passes `until_s` (those still
    unfinished then are timeouts, as the bench client's limit makes them)."""
    replicas = [Replica(i, config, costs) for i in range(gpus)]
    events: list[tuple[float, int, int, int]] = [(r.arrival_s, _ARRIVAL, i, i) for i, r in enumerate(requests)]
    heapq.heapify(events)
    counter = len(requests)
    wake_at: list[float | None] = [None] * gpus

    def push(t: float, kind: int, target: int) -> None:
        nonlocal counter
        counter += 1
        heapq.heappush(events, (t, kind, counter, target))

    def run(replica: Replica, now: float) -> None:
        duration = replica.start_step(now)
        if duration is not None:
            push(now + duration, _STEP_END, replica.index)
            return
        ready = replica.next_ready_s(now)
        if ready is not None and wake_at[replica.index] != ready:
            wake_at[replica.index] = ready
            push(ready, _WAKE, replica.index)

    while events:
        now, kind, _, target = heapq.heappop(events)
        if now > until_s:
            break
        if kind == _ARRIVAL:
            req = requests[target]
            replica = router.choose(req.adapter, replicas)
            replica.enqueue(req, now)
        else:
            replica = replicas[target]
            if kind == _STEP_END:
                replica.finish_step(now)
        if not replica.busy:
            run(replica, now)
    return ClusterResult(requests, replicas)
