"""`valora adapters build`: pack the task file's tasks into adapters, score them, and write the result.

    OUT/adapters/adapter-N/   PEFT adapter (plus heads.json / heads.safetensors when it has head tasks)
    OUT/report.json           everything below, machine-readable
    OUT/report.md             tasks per adapter, floors, validation and held-out accuracy next to the base
                              model's, training time, the fusion log, and the `valora serve` line
    OUT/.work/                trained states and scores (the cache that makes a re-run resume)
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from valora.adaptgen.fusion import Trainer, pack
from valora.adaptgen.report import render_markdown
from valora.adaptgen.spec import Suite
from valora.adaptgen.workspace import Workspace


@dataclass(frozen=True)
class BuildConfig:
    suite: Suite
    base: Path
    out: Path
    cache: Path | None = None  # default: OUT/.work
    strategy: str = "greedy"

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.out / ".work"


class _Progress:
    """The trainer, with a progress bar over the candidate adapters scored and their validation accuracy."""

    def __init__(self, inner: Trainer) -> None:
        self.inner = inner
        self.bar = tqdm(desc="candidate adapters", unit="adapter")

    def train(self, tasks, start, steps_scale=1):
        return self.inner.train(tasks, start, steps_scale)

    def validate(self, state, tasks):
        scores = self.inner.validate(state, tasks)
        self.bar.write("validation: " + ", ".join(f"{t} {s:.1%}" for t, s in scores.items()))
        self.bar.update(1)
        return scores


def build(config: BuildConfig) -> dict:
    """Run the strategy, export the adapters, score them on the held-out split; returns the report."""
    t0 = time.perf_counter()
    suite = config.suite
    ws = Workspace(suite, config.base, config.cache_dir)
    order = [t.name for t in suite.tasks]
    floors = {t.name: t.floor for t in suite.tasks}
    progress = _Progress(ws)
    packing = pack(config.strategy, order, floors, progress)
    progress.bar.close()
    adapters_dir = config.out / "adapters"
    shutil.rmtree(adapters_dir, ignore_errors=True)
    adapters = []
    for i, a in enumerate(packing.adapters, start=1):
        name = f"adapter-{i}"
        shutil.copytree(ws.state_dir(a.state), adapters_dir / name, ignore=shutil.ignore_patterns("state.json"))
        held_out = ws.scores(a.state, a.tasks, "test")
        adapters.append({"name": name, "path": str((adapters_dir / name).resolve()), "tasks": a.tasks,
                         "heads": [t for t in a.tasks if ws.tasks[t].by_head],
                         "training_seconds": ws.training_seconds(a.state),
                         "validation": {t: a.scores[t] for t in a.tasks},
                         "held_out": {t: held_out[t].to_json() for t in a.tasks}})
    base = ws.scores(None, order, "test")
    report = {
        "strategy": config.strategy, "base": str(config.base.resolve()), "tasks": _tasks(ws, suite),
        "adapter_spec": asdict(suite.adapter), "head_width": suite.head_width, "image_size": suite.image_size,
        "adapters": adapters, "base_held_out": {t: s.to_json() for t, s in base.items()},
        "fusion_log": [asdict(e) for e in packing.events], "below_floor": packing.below_floor(floors),
        "trainings": {"run": ws.trained, "reused": ws.reused}, "wall_seconds": time.perf_counter() - t0,
    }
    config.out.mkdir(parents=True, exist_ok=True)
    (config.out / "report.json").write_text(json.dumps(report, indent=2))
    (config.out / "report.md").write_text(render_markdown(report))
    return report


def _tasks(ws: Workspace, suite: Suite) -> list[dict]:
    rows = []
    for spec in suite.tasks:
        task = ws.tasks[spec.name]
        data = task.data
        rows.append({"name": spec.name, "dataset": spec.dataset, "options": spec.options, "prompt": task.question,
                     "answer": spec.answer, "kind": "box" if data.is_box else "classify", "floor": spec.floor,
                     "labels": list(data.labels or ()), "sizes": {s: len(e) for s, e in data.splits.items()},
                     "teacher": asdict(task.teacher) if task.teacher else None})
    return rows

