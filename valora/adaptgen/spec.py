"""The task file (TASKS.yaml) and what it describes: tasks, their floors, and the adapters' shape.

    image_size: 56                  # images are generated at this size (the base model's input size)
    adapter: {r: 16, lora_alpha: 32, lm_modules: [q_proj, ...], vision_modules: []}
    train: {steps: 200, batch_size: 64, lr: 0.004, warmup: 20, seed: 0}
    head_width: 256                 # hidden width of every task head
    tasks:
      - name: parity                # also the head's name; letters, digits, '-' and '_'
        dataset: {kind: digits, source: sklearn, answer: parity}   # a generator of datasets.py and its options
        prompt: "Is the digit odd or even?"   # {labels} becomes the class labels joined by " or "
        floor: 0.9                  # least accuracy on the validation split for the task to ship in an adapter
        answer: text                # text (decoded by the LM) or head (a classification or box head)
        teacher: {model: logistic, labelled: 0.1}   # optional: see teachers.py
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from valora.errors import UserError, from_mapping
from valora.training.specs import AdapterSpec, TrainSpec

NAME = re.compile(r"^[A-Za-z0-9_-]+$")


class SpecError(UserError):
    """A task file that cannot be built; the message names the task and the field."""


@dataclass(frozen=True)
class TeacherSpec:
    model: str = "logistic"
    labelled: float = 0.1  # share of the training images whose true labels the teacher learns from


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    prompt: str
    floor: float
    options: dict[str, Any] = field(default_factory=dict)
    answer: str = "text"
    teacher: TeacherSpec | None = None
    seed: int = 0


@dataclass(frozen=True)
class Suite:
    tasks: tuple[TaskSpec, ...]
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    image_size: int = 56
    head_width: int = 256

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    def with_overrides(self, *, tasks: list[str] | None = None, steps: int | None = None, rank: int | None = None,
                       floor: float | None = None, seed: int | None = None) -> Suite:
        """The same suite with some tasks only, or another training length, rank, floor or seed for all."""
        picked = self.tasks
        if tasks:
            unknown = set(tasks) - {t.name for t in self.tasks}
            if unknown:
                raise SpecError(f"no task named {', '.join(sorted(unknown))} in the task file")
            picked = tuple(t for t in self.tasks if t.name in tasks)
        if floor is not None:
            picked = tuple(replace(t, floor=floor) for t in picked)
        train = self.adapter.train
        train = replace(train, steps=steps or train.steps, seed=train.seed if seed is None else seed)
        adapter = replace(self.adapter, r=rank or self.adapter.r, train=train)
        return replace(self, tasks=picked, adapter=adapter)


def fingerprint(obj: Any) -> str:
    """A short stable hash of dataclasses / JSON-able values (cache keys)."""
    if hasattr(obj, "__dataclass_fields__"):
        obj = asdict(obj)
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _build(cls, raw: Any, where: str):
    return from_mapping(cls, raw, where, SpecError)


def _task(raw: Any, i: int) -> TaskSpec:
    where = f"tasks[{i}]" + (f" ({raw.get('name')})" if isinstance(raw, dict) and raw.get("name") else "")
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: expected a mapping")
    raw = dict(raw)
    if "options" in raw:
        raise SpecError(f"{where}: dataset options go inside 'dataset', next to its 'kind'")
    dataset = raw.pop("dataset", None)
    if not isinstance(dataset, dict) or "kind" not in dataset:
        raise SpecError(f"{where}: 'dataset' must be a mapping with a 'kind'")
    dataset = dict(dataset)
    raw["dataset"] = dataset.pop("kind")
    raw["options"] = dataset
    if raw.get("teacher") is not None:
        raw["teacher"] = _build(TeacherSpec, raw["teacher"], f"{where}.teacher")
    task = _build(TaskSpec, raw, where)
    if not NAME.match(str(task.name)):
        raise SpecError(f"{where}: name must be letters, digits, '-' or '_'")
    if not isinstance(task.floor, (int, float)) or not 0 <= task.floor <= 1:
        raise SpecError(f"{where}: floor must be a number in [0, 1]")
    if task.answer not in ("text", "head"):
        raise SpecError(f"{where}: answer must be 'text' or 'head'")
    if task.teacher is not None and (task.teacher.model != "logistic" or not 0 < task.teacher.labelled < 1):
        raise SpecError(f"{where}: teacher needs model 'logistic' and 0 < labelled < 1")
    return task


def parse_suite(raw: Any) -> Suite:
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list) or not raw["tasks"]:
        raise SpecError("the task file needs a non-empty 'tasks' list")
    raw = dict(raw)
    tasks = tuple(_task(t, i) for i, t in enumerate(raw.pop("tasks")))
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise SpecError(f"task names must be unique: {names}")
    train = _build(TrainSpec, {"steps": 200, "lr": 4e-3, **raw.pop("train", {})}, "train")
    adapter_raw = dict(raw.pop("adapter", {}))
    for key in ("lm_modules", "vision_modules"):
        if key in adapter_raw:
            adapter_raw[key] = tuple(adapter_raw[key])
    adapter = _build(AdapterSpec, {**adapter_raw, "train": train}, "adapter")
    if not adapter.lm_modules and not adapter.vision_modules:
        raise SpecError("adapter: name at least one module to adapt")
    return _build(Suite, {**raw, "tasks": tasks, "adapter": adapter}, "task file")


def load_suite(path: str | Path) -> Suite:
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SpecError(f"cannot read {path}: {e}") from e
    return parse_suite(raw)
