"""How tasks are packed into adapters. Three strategies over the same trainer:

- `greedy` (accuracy-aware, the paper's): tasks are taken in the task file's order. Each is added to the current
  adapter (the last one opened), which is trained on the union of its tasks, starting from its accepted weights.
  Every task of the adapter is then scored on the validation split. If all meet their floors, the fusion is kept;
  otherwise it is rolled back (the adapter keeps its previous weights and tasks) and the task opens a new adapter,
  trained on it alone, which becomes the current one. A task that misses its floor even alone still ships, alone,
  and is reported as missing it; nothing is ever fused into such an adapter.
- `per-task`: one adapter per task.
- `single`: one adapter for all tasks, trained for as many steps as the per-task adapters together.

The result never depends on anything but the task file, the base model and the seed: training is seeded, and
decisions use the validation split only (never the held-out one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

STRATEGIES = ("greedy", "per-task", "single")


class Trainer(Protocol):
    def train(self, tasks: Sequence[str], start: str | None, steps_scale: int = 1) -> str:
        """Train an adapter on `tasks` (from the state `start`); returns the new state's key."""

    def validate(self, state: str, tasks: Sequence[str]) -> dict[str, float]:
        """Validation accuracy of each task under the adapter `state`."""


@dataclass
class Adapter:
    tasks: list[str]
    state: str
    scores: dict[str, float]  # validation accuracy per task
    closed: bool = False  # a task missed its floor alone: nothing more is fused into it


@dataclass(frozen=True)
class Event:
    task: str
    adapter: int  # index of the adapter the task ended up in
    action: str  # "opened", "fused", "rolled back"
    scores: dict[str, float]  # validation accuracy of every task of the trained candidate
    below: tuple[str, ...] = ()  # tasks under their floor in that candidate


@dataclass
class Packing:
    adapters: list[Adapter] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def below_floor(self, floors: dict[str, float]) -> list[str]:
        return [t for a in self.adapters for t in a.tasks if a.scores[t] < floors[t]]


def _below(scores: dict[str, float], floors: dict[str, float]) -> tuple[str, ...]:
    return tuple(t for t, s in scores.items() if s < floors[t])


def _open(trainer: Trainer, packing: Packing, task: str, floors: dict[str, float]) -> Adapter:
    state = trainer.train([task], None)
    scores = trainer.validate(state, [task])
    adapter = Adapter([task], state, scores, closed=bool(_below(scores, floors)))
    packing.adapters.append(adapter)
    packing.events.append(Event(task, len(packing.adapters) - 1, "opened", scores, _below(scores, floors)))
    return adapter


def greedy(order: Sequence[str], floors: dict[str, float], trainer: Trainer) -> Packing:
    packing = Packing()
    current: Adapter | None = None
    for task in order:
        if current is not None and not current.closed:
            tasks = [*current.tasks, task]
            state = trainer.train(tasks, current.state)
            scores = trainer.validate(state, tasks)
            below = _below(scores, floors)
            index = packing.adapters.index(current)
            if not below:
                current.tasks, current.state, current.scores = tasks, state, scores
                packing.events.append(Event(task, index, "fused", scores))
                continue
            packing.events.append(Event(task, index, "rolled back", scores, below))
        current = _open(trainer, packing, task, floors)
    return packing


def per_task(order: Sequence[str], floors: dict[str, float], trainer: Trainer) -> Packing:
    packing = Packing()
    for task in order:
        _open(trainer, packing, task, floors)
    return packing


def single(order: Sequence[str], floors: dict[str, float], trainer: Trainer) -> Packing:
    state = trainer.train(list(order), None, steps_scale=len(order))
    scores = trainer.validate(state, list(order))
    events = [Event(t, 0, "fused" if i else "opened", scores, _below(scores, floors)) for i, t in enumerate(order)]
    return Packing([Adapter(list(order), state, scores)], events)


def pack(strategy: str, order: Sequence[str], floors: dict[str, float], trainer: Trainer) -> Packing:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return {"greedy": greedy, "per-task": per_task, "single": single}[strategy](order, floors, trainer)
