"""Acceptance 2, the rules themselves: the greedy packing honours every floor, rolls back a fusion that costs any
task its floor, and opens new adapters as floors rise or capacity (rank) shrinks. The trainer here is a model of
LoRA capacity, so each rule is checked exactly; tests/adaptgen/test_build.py checks them with real training."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from valora.adaptgen.fusion import greedy, pack, per_task, single

TASKS = ["a", "b", "c", "d", "e"]


class CapacityTrainer:
    """Accuracy of a task alone is its `skill`; each further task in the adapter costs every task `crowding`
    at rank 16, four times that at rank 4. A state's key names its tasks."""

    def __init__(self, skill: dict[str, float], rank: int, crowding: float = 0.01) -> None:
        self.skill, self.rank, self.crowding = skill, rank, crowding
        self.trained: list[tuple[tuple[str, ...], str | None, int]] = []

    def train(self, tasks: Sequence[str], start: str | None, steps_scale: int = 1) -> str:
        self.trained.append((tuple(tasks), start, steps_scale))
        return "+".join(tasks)

    def validate(self, state: str, tasks: Sequence[str]) -> dict[str, float]:
        members = state.split("+")
        assert list(tasks) == members
        penalty = self.crowding * (len(members) - 1) * 16 / self.rank
        return {t: self.skill[t] - penalty for t in members}


SKILL = {"a": 0.97, "b": 0.95, "c": 0.99, "d": 0.9, "e": 0.96}


def adapters(floor: float, rank: int = 16, skill: dict | None = None) -> list[list[str]]:
    trainer = CapacityTrainer(skill or SKILL, rank)
    return [a.tasks for a in greedy(TASKS, {t: floor for t in TASKS}, trainer).adapters]


def test_low_floors_fuse_everything_into_one_adapter():
    assert adapters(0.5) == [TASKS]


def test_a_higher_floor_forces_more_adapters():
    counts = [len(adapters(f)) for f in (0.5, 0.8, 0.85, 0.88, 0.9)]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


def test_a_smaller_rank_forces_more_adapters():
    counts = [len(adapters(0.85, rank=r)) for r in (64, 16, 4, 1)]
    assert counts == sorted(counts) and counts[0] < counts[-1], counts


@pytest.mark.parametrize("floor", [0.5, 0.8, 0.85, 0.88, 0.9, 0.95])
@pytest.mark.parametrize("rank", [1, 4, 16])
def test_no_adapter_ships_a_task_under_its_floor_unless_it_is_alone(floor, rank):
    trainer = CapacityTrainer(SKILL, rank)
    floors = {t: floor for t in TASKS}
    packing = greedy(TASKS, floors, trainer)
    assert sorted(t for a in packing.adapters for t in a.tasks) == sorted(TASKS)
    for a in packing.adapters:
        assert a.scores == trainer.validate(a.state, a.tasks)  # the scores shipped are the state's own
        if len(a.tasks) > 1:
            assert all(a.scores[t] >= floor for t in a.tasks)
    assert set(packing.below_floor(floors)) == {t for t in TASKS if SKILL[t] < floor}


def test_rollback_keeps_the_previous_weights_and_the_order():
    trainer = CapacityTrainer({**SKILL, "b": 0.805}, rank=16)  # b meets 0.8 alone, not beside any other task
    packing = greedy(TASKS, {t: 0.8 for t in TASKS}, trainer)
    assert [a.tasks for a in packing.adapters] == [["a"], ["b"], ["c", "d", "e"]]
    assert packing.adapters[0].state == "a"  # the rolled-back candidate a+b was not kept
    assert [(e.task, e.action) for e in packing.events] == [
        ("a", "opened"), ("b", "rolled back"), ("b", "opened"), ("c", "rolled back"), ("c", "opened"),
        ("d", "fused"), ("e", "fused")]
    assert packing.events[1].below == ("b",) and packing.events[3].below == ("b",)
    # Each fusion trains from the adapter's accepted state; a new adapter starts from scratch.
    assert trainer.trained[:5] == [(("a",), None, 1), (("a", "b"), "a", 1), (("b",), None, 1), (("b", "c"), "b", 1),
                                   (("c",), None, 1)]


def test_a_task_under_its_floor_alone_ships_alone_and_takes_no_fusion():
    packing = greedy(TASKS, {**{t: 0.8 for t in TASKS}, "b": 0.99}, CapacityTrainer(SKILL, rank=64))
    assert [a.tasks for a in packing.adapters] == [["a"], ["b"], ["c", "d", "e"]]
    assert packing.adapters[1].closed and packing.below_floor({**{t: 0.8 for t in TASKS}, "b": 0.99}) == ["b"]


def test_baseline_strategies():
    trainer = CapacityTrainer(SKILL, rank=16)
    floors = {t: 0.9 for t in TASKS}
    assert [a.tasks for a in per_task(TASKS, floors, trainer).adapters] == [[t] for t in TASKS]
    one = single(TASKS, floors, trainer)
    assert [a.tasks for a in one.adapters] == [TASKS] and trainer.trained[-1] == (tuple(TASKS), None, len(TASKS))
    assert pack("greedy", TASKS, floors, trainer).adapters
    with pytest.raises(ValueError, match="unknown strategy"):
        pack("best", TASKS, floors, trainer)
