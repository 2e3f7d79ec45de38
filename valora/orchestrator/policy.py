"""The policy interface: each step a policy looks at the queues and decides the inference mode and the batch.

A policy decides *what* runs, never what a request's answer is: the scheduler still enforces KV blocks, the token
budget and adapter slots, and every mode computes the same function (merged weights are W + s·B·A).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from valora.orchestrator.cost_model import StepWork


class Sequence(Protocol):
    """What a policy reads of a queued or running sequence (the engine's `Sequence` has these and more): the
    orchestrator sits below the engine and never imports it."""

    seq_id: int
    lora_name: str | None
    arrival_time: float
    deadline: float | None  # absolute time by which its request should finish, if it has one
    num_computed: int  # tokens already in the KV cache

    def __len__(self) -> int: ...


@dataclass
class Decision:
    hot: str | None = None  # adapter to fold into the weights this step (None: unmerged)
    paused: frozenset[Sequence] = frozenset()  # running sequences that sit this step out, keeping their KV
    admit_order: list[Sequence] | None = None  # waiting sequences to try, in order; None = first come first served
    costs: dict[str | None, float] | None = None  # the policy's predicted cost of each hot adapter it weighed


@dataclass
class SchedulerView:
    waiting: Seq[Sequence]  # oldest first (preempted ones at the front)
    running: Seq[Sequence]
    hot: str | None  # the adapter merged right now
    now: float
    max_num_seqs: int
    max_batched_tokens: int
    adapter_bytes: Callable[[str], int] = field(default=lambda name: 0)  # an adapter's own weights
    merge_bytes: Callable[[str], int] = field(default=lambda name: 0)  # base weights merging it rewrites
    held: str | None = None  # the adapter the shadow weights still hold: merging it again is free


@dataclass
class StepRecord:
    """What a step did, fed back to the policy (dLoRA adapts its thresholds from it, `valora` learns step costs
    from it) and written to the engine's step log."""

    mode: str
    hot: str | None
    num_seqs: int
    num_tokens: int
    duration_s: float  # launch to results, switch and graph captures included
    switch_s: float
    merged_bytes: int = 0  # base weights the switch rewrote (0: no switch, or a free one)
    work: StepWork | None = None  # what it computed (None where unknown)
    graph: bool = False  # replayed from a CUDA graph
    decode: bool = False  # every sequence decoded one token
    capture_s: float = 0.0  # CUDA graphs captured during the step
    predicted_s: float | None = None  # the policy's cost model for this step, before it saw it
    costs: dict[str | None, float] | None = None  # the decision's predicted cost per hot adapter weighed
    time: float = 0.0  # wall clock when its results came in
    gc_s: float = 0.0  # the host in garbage collections between launch and collection (engine/host_pauses.py)
    compile_s: float = 0.0  # the host building Triton kernels at first use, likewise
    alloc_retries: int = 0  # CUDA caching-allocator retries (free the cache, malloc again) since the last slow step
    launch_s: float = 0.0  # the host scheduling, preparing and queueing it (a stall here is the host's, not the GPU's)
    outside_s: float = 0.0  # the engine's caller (the core loop: requests in, outputs out) while the step was in flight

    @property
    def path(self) -> str:
        return "graph" if self.graph else "eager"

    @property
    def compute_s(self) -> float:
        """The step itself: what a cost model predicts (switches and captures are one-off costs)."""
        return max(self.duration_s - self.switch_s - self.capture_s, 0.0)

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("work", "costs")}
        d["work"] = self.work.to_json() if self.work is not None else None
        d["costs"] = {k or "": v for k, v in self.costs.items()} if self.costs is not None else None
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> StepRecord:
        d = dict(d)
        work, costs = d.pop("work", None), d.pop("costs", None)
        return StepRecord(**d, work=StepWork.from_json(work) if work is not None else None,
                          costs={k or None: v for k, v in costs.items()} if costs is not None else None)


class Policy:
    name: ClassVar[str]
    lora_backend: ClassVar[str | None] = None  # the kernel the original system used; applies when backend=auto
    merges: ClassVar[bool] = False  # needs shadow weights to fold an adapter in

    def decide(self, view: SchedulerView) -> Decision:
        raise NotImplementedError

    def observe(self, record: StepRecord) -> None:
        """Feedback after each step; stateless policies ignore it."""

    def predict(self, record: StepRecord) -> float | None:
        """Predicted `compute_s` of a step that ran (before `observe` sees it); None for a policy without a cost
        model."""
        return None


def policy_classes() -> dict[str, type[Policy]]:
    """Every policy by its `--scheduler` name."""
    from valora.orchestrator.baselines import DLoRAPolicy, PunicaPolicy, SLoRAPolicy
    from valora.orchestrator.valora_policy import ValoraPolicy

    return {p.name: p for p in (ValoraPolicy, SLoRAPolicy, PunicaPolicy, DLoRAPolicy)}


def make_policy(name: str, **options) -> Policy:
    policies = policy_classes()
    if name not in policies:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(policies)}")
    cls = policies[name]
    return cls(**{k: v for k, v in options.items() if k in getattr(cls, "OPTIONS", ())})
