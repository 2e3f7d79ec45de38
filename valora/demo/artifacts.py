"""The demo's trained model and adapters, built once and cached under the user's cache directory.

The cache key is a hash of the recipe and the VaLoRA version, so a changed recipe retrains instead of
serving stale weights. A build goes to a temporary folder that is renamed into place only when complete,
so an interrupted first run never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from valora import __version__
from valora.demo.data import DigitSet
from valora.demo.tasks import ADAPTER_TASKS, BASE_TASK, Task
from valora.demo.train import AdapterSpec, ModelSpec, TaskEncoder, TrainSpec, train_adapter, train_base


@dataclass(frozen=True)
class DemoRecipe:
    model: ModelSpec = field(default_factory=ModelSpec)
    base: TrainSpec = field(default_factory=lambda: TrainSpec(steps=300, lr=2e-3, weight_decay=0.1))
    adapter: AdapterSpec = field(default_factory=AdapterSpec)
    base_task: Task = BASE_TASK
    adapter_tasks: tuple[Task, ...] = ADAPTER_TASKS
    test_fraction: float = 0.2
    split_seed: int = 0

    def fingerprint(self) -> str:
        tasks = [self.base_task, *self.adapter_tasks]
        spec = {
            "model": asdict(self.model), "base": asdict(self.base), "adapter": asdict(self.adapter),
            "tasks": [[t.name, t.question, [t.answer(d) for d in range(10)]] for t in tasks],
            "test_fraction": self.test_fraction, "split_seed": self.split_seed, "valora": __version__,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class DemoArtifacts:
    root: Path
    base: Path
    adapters: dict[str, Path]


def cache_dir() -> Path:
    """`$VALORA_CACHE_DIR`, else `$XDG_CACHE_HOME/valora`, else `~/.cache/valora`."""
    if os.environ.get("VALORA_CACHE_DIR"):
        return Path(os.environ["VALORA_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "valora"


def _artifacts(root: Path, recipe: DemoRecipe) -> DemoArtifacts:
    return DemoArtifacts(root, root / "base", {t.name: root / "adapters" / t.name for t in recipe.adapter_tasks})


def cached(recipe: DemoRecipe, cache: Path) -> DemoArtifacts | None:
    root = cache / f"demo-{recipe.fingerprint()}"
    return _point_adapters_at_base(_artifacts(root, recipe)) if (root / "manifest.json").is_file() else None


def _point_adapters_at_base(arts: DemoArtifacts) -> DemoArtifacts:
    """PEFT records where the base was when an adapter was saved: the staging folder, gone after the rename. Point
    `base_model_name_or_path` at the cached base instead (also fixes caches written before this existed)."""
    for adapter in arts.adapters.values():
        path = adapter / "adapter_config.json"
        config = json.loads(path.read_text())
        if config.get("base_model_name_or_path") != str(arts.base):
            config["base_model_name_or_path"] = str(arts.base)
            path.write_text(json.dumps(config, indent=2, sort_keys=True))
    return arts


def build(recipe: DemoRecipe, cache: Path, train: DigitSet) -> DemoArtifacts:
    """Train the base model, then each adapter on the frozen base, and cache them in the HF / PEFT formats."""
    from transformers import Qwen2VLForConditionalGeneration

    root = cache / f"demo-{recipe.fingerprint()}"
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    staged = _artifacts(tmp, recipe)
    train_base(staged.base, train, recipe.base_task, recipe.model, recipe.base)
    base = Qwen2VLForConditionalGeneration.from_pretrained(staged.base)
    encoder = TaskEncoder(staged.base, train.images)
    for task in recipe.adapter_tasks:
        train_adapter(staged.base, staged.adapters[task.name], train, task, recipe.adapter, base, encoder)
    manifest = {"valora": __version__, "fingerprint": recipe.fingerprint(), "train_images": len(train),
                "base_task": recipe.base_task.name, "adapters": [t.name for t in recipe.adapter_tasks]}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return _point_adapters_at_base(_artifacts(root, recipe))
