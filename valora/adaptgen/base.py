"""`--base demo`: the demo's small Qwen2-VL (its size, base training and digit-naming task), trained only on the
training split of scikit-learn's digits under the suite's split rule, so no validation or held-out image of any
task was ever seen by the base model either. Built once and cached."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

from valora.adaptgen.sources import VALIDATION, sklearn_digits
from valora.adaptgen.spec import fingerprint


def demo_base(cache: Path, steps: int | None = None) -> Path:
    """The base model's directory; `steps` shortens its training (the CI-sized build uses 100)."""
    from valora.demo.artifacts import DemoRecipe
    from valora.demo.data import load_digits
    from valora.demo.train import train_base

    recipe = DemoRecipe()
    if steps is not None:
        recipe = replace(recipe, base=replace(recipe.base, steps=steps))
    key = fingerprint({"model": recipe.model, "base": recipe.base, "task": recipe.base_task.name,
                       "split": ["sklearn-train", VALIDATION], "demo": recipe.fingerprint()})
    root = cache / f"base-demo-{key}"
    if (root / "config.json").is_file():
        return root
    train = load_digits(recipe.model.image_size).subset(sklearn_digits().split.train.tolist())
    tmp = root.with_name(f"{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_base(tmp, train, recipe.base_task, recipe.model, recipe.base)
    tmp.rename(root)
    return root
