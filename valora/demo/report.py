"""Score the replies per task and print them as one table: what each adapter does, how well, and what the
base model says when asked the same question."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from valora.demo.client import Reply
from valora.demo.tasks import Task


@dataclass(frozen=True)
class TaskScore:
    task: Task
    model: str
    accuracy: float
    base_accuracy: float | None  # the base model on this task's question (None for the base task itself)
    examples: list[tuple[int, str, str | None]]  # (digit, this model's answer, the base model's answer)
    p50_latency: float


def _accuracy(replies: list[Reply], labels: list[int]) -> float:
    return sum(r.text == r.query.task.answer(labels[r.query.image]) for r in replies) / len(replies)


def score(replies: list[Reply], labels: list[int], base_model: str, num_examples: int = 4) -> list[TaskScore]:
    """One row per task, in the order tasks first appear; `base_model` is the base model's served name."""
    tasks: dict[str, Task] = {}
    for r in replies:
        tasks.setdefault(r.query.task.name, r.query.task)
    rows = []
    for name, task in tasks.items():
        own = [r for r in replies if r.query.task.name == name and r.query.model != base_model]
        base = [r for r in replies if r.query.task.name == name and r.query.model == base_model]
        primary = own or base  # the base task is served by the base model itself
        base_by_image = {r.query.image: r.text for r in base} if own else {}
        examples = [(labels[r.query.image], r.text, base_by_image.get(r.query.image)) for r in primary[:num_examples]]
        rows.append(TaskScore(
            task, primary[0].query.model, _accuracy(primary, labels),
            _accuracy(base, labels) if own and base else None, examples,
            statistics.median(r.latency for r in primary),
        ))
    return rows


def render(rows: list[TaskScore]) -> str:
    header = ("task", "served by", "held-out accuracy", "base model on it", "examples: digit -> answer (base's)",
              "p50 latency")
    lines = []
    for s in rows:
        examples = "  ".join(f"{d}->{a}" + (f" ({b})" if b is not None else "") for d, a, b in s.examples)
        lines.append((s.task.summary, s.model, f"{s.accuracy:.1%}",
                      "-" if s.base_accuracy is None else f"{s.base_accuracy:.1%}", examples,
                      f"{s.p50_latency * 1000:.0f} ms"))
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]

    def fmt(row) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(r) for r in lines)])
