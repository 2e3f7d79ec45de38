"""The trainer behind every strategy: trains and scores adapters, and remembers both on disk.

Every trained adapter is stored under a key that hashes everything it depends on (base model, tasks and their
data, the adapter it started from, LoRA shape, steps, seed); every score under its adapter, task and split. A
build that is interrupted and run again, or another build sharing the cache (say, with a higher floor), redoes
nothing already done. Writes go to a temporary folder renamed into place, so a crash never leaves half a state.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from valora.adaptgen import datasets
from valora.adaptgen.evaluate import Evaluator, Score
from valora.adaptgen.spec import Suite, fingerprint
from valora.adaptgen.tasks import Task

STATE = "state.json"
_HASHED_BYTES = 256 * 2**20  # weight files up to this size are hashed whole; larger ones by size and mtime


def model_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256()
    for f in sorted([*model_dir.glob("*.json"), *model_dir.glob("*.safetensors")]):
        h.update(f.name.encode())
        size = f.stat().st_size
        h.update(f.read_bytes() if size <= _HASHED_BYTES else f"{size}:{f.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Workspace:
    def __init__(self, suite: Suite, base_dir: Path, cache: Path) -> None:
        self.suite, self.base_dir, self.cache = suite, base_dir, cache
        self.tasks = {t.name: Task.load(t, suite.image_size) for t in suite.tasks}
        self.base_key = model_fingerprint(base_dir)
        self.trained = self.reused = 0
        self._hf = self._inputs = self._evaluator = None

    # -- lazily built: a fully cached build never loads a model for training --------------------------------
    @property
    def evaluator(self) -> Evaluator:
        if self._evaluator is None:
            self._evaluator = Evaluator(self.base_dir)
        return self._evaluator

    def _training(self):
        if self._hf is None:
            from transformers import AutoModelForImageTextToText

            from valora.adaptgen.train import TaskInputs

            self._hf = AutoModelForImageTextToText.from_pretrained(self.base_dir)
            self._inputs = TaskInputs(self.base_dir)
        return self._hf, self._inputs

    # -- keys and paths -------------------------------------------------------------------------------------
    def task_key(self, name: str) -> str:
        """What training and scoring a task depend on (its floor only decides, so it is left out)."""
        spec = replace(self.tasks[name].spec, floor=0.0)
        return fingerprint({"task": spec, "size": self.suite.image_size, "data": datasets.VERSION})

    def state_dir(self, key: str) -> Path:
        return self.cache / "states" / key

    def state(self, key: str) -> dict:
        return json.loads((self.state_dir(key) / STATE).read_text())

    def training_seconds(self, key: str | None) -> float:
        """Of this adapter and every adapter it was trained from."""
        total = 0.0
        while key is not None:
            s = self.state(key)
            total, key = total + s["seconds"], s["start"]
        return total

    # -- Trainer --------------------------------------------------------------------------------------------
    def train(self, tasks: Sequence[str], start: str | None, steps_scale: int = 1) -> str:
        from valora.adaptgen.train import train_adapter

        spec = self.suite.adapter
        spec = replace(spec, train=replace(spec.train, steps=spec.train.steps * steps_scale))
        key = fingerprint({"base": self.base_key, "tasks": [self.task_key(t) for t in tasks], "start": start,
                           "adapter": spec, "head_width": self.suite.head_width})
        final = self.state_dir(key)
        if (final / STATE).is_file():
            self.reused += 1
            return key
        hf, inputs = self._training()
        tmp = final.with_name(f"{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        t0 = time.perf_counter()
        desc = "+".join(tasks) if start is None else f"{'+'.join(tasks)} (from {len(tasks) - 1} fused)"
        train_adapter(hf, inputs, [self.tasks[t] for t in tasks], spec, self.suite.head_width, tmp,
                      self.state_dir(start) if start else None, desc=desc)
        (tmp / STATE).write_text(json.dumps({"tasks": list(tasks), "start": start, "steps": spec.train.steps,
                                             "seconds": time.perf_counter() - t0}))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(final)
        self.trained += 1
        return key

    def validate(self, state: str, tasks: Sequence[str]) -> dict[str, float]:
        return {t: s.accuracy for t, s in self.scores(state, tasks, "val").items()}

    # -- scores ---------------------------------------------------------------------------------------------
    def scores(self, state: str | None, tasks: Sequence[str], split: str) -> dict[str, Score]:
        """Per task on `split`, through the engine; `state` None is the base model alone."""
        path = self.cache / "scores" / f"{state or 'base-' + self.base_key}-{split}.json"
        known = json.loads(path.read_text()) if path.is_file() else {}
        todo = [t for t in tasks if self.task_key(t) not in known]
        if todo:
            adapter = self.state_dir(state) if state else None
            fresh = self.evaluator.evaluate(adapter, [self.tasks[t] for t in todo], split)
            known.update({self.task_key(t): s.to_json() for t, s in fresh.items()})
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, indent=1))
            tmp.replace(path)
        return {t: Score(**known[self.task_key(t)]) for t in tasks}
