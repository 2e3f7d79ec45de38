"""The policy interface: each step a policy looks at the queues and decides the inference mode and the batch.

A policy decides *what* runs, never what a request's answer is: the scheduler still enforces KV blocks, the token
budget and adapter slots, and every mode computes the same function (merged weights are W + s·B·A).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import ClassVar, Protocol


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


@dataclass
class StepRecord:
    """What a step did, fed back to the policy (dLoRA adapts its thresholds from it)."""

    mode: str
    hot: str | None
    num_seqs: int
    num_tokens: int
    duration_s: float
    switch_s: float
    merged_bytes: int = 0  # base weights the switch rewrote (0: no switch, or a free one)


class Policy:
    name: ClassVar[str]
    lora_backend: ClassVar[str | None] = None  # the kernel the original system used; applies when backend=auto
    merges: ClassVar[bool] = False  # needs shadow weights to fold an adapter in

    def decide(self, view: SchedulerView) -> Decision:
        raise NotImplementedError

    def observe(self, record: StepRecord) -> None:
        """Feedback after each step; stateless policies ignore it."""


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
