"""A tiny Qwen2-VL and PEFT adapters that carry task heads (random weights, seeded)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from valora.heads import HeadConfig, TaskHead, save_heads
from valora.testing.checkpoints import peft_target_regex
from valora.testing.families import LM_LINEARS

LABELS = ("cat", "dog", "bird")
VISION_AND_LM = r".*(visual.*\.(qkv|fc1)|language_model.*\.(q_proj|v_proj))$"


@pytest.fixture(scope="session")
def head_model(model_factory) -> Path:
    return model_factory("qwen2_vl", initializer_range=0.05)


def hidden_size(model_dir: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).text_config.hidden_size


def with_heads(adapter: Path, out: Path, hidden: int, kinds: dict[str, str], default: str | None,
               seed: int = 0) -> Path:
    """A copy of `adapter` with one random head per entry of `kinds` (name -> "classify" | "box")."""
    shutil.copytree(adapter, out)
    torch.manual_seed(seed)
    heads = {n: TaskHead(HeadConfig(n, k, hidden, 32, LABELS if k == "classify" else ())) for n, k in kinds.items()}
    for h in heads.values():  # larger than the default init, so that scores differ clearly between inputs
        for p in h.parameters():
            torch.nn.init.normal_(p, std=0.5)
    save_heads(out, heads, default)
    return out


@pytest.fixture(scope="session")
def head_adapters(head_model, adapter_factory, tmp_path_factory) -> dict[str, Path]:
    """`one`: a classification head, the default; `two`: a classification and a box head, no default (and the
    vision tower adapted too); `plain`: no heads."""
    root = tmp_path_factory.mktemp("head-adapters")
    hidden = hidden_size(head_model)
    lm = adapter_factory(head_model, r=8, target_modules=peft_target_regex(LM_LINEARS), seed=7)
    vis = adapter_factory(head_model, r=4, target_modules=VISION_AND_LM, seed=8)
    return {"one": with_heads(lm, root / "one", hidden, {"kind": "classify"}, "kind", seed=1),
            "two": with_heads(vis, root / "two", hidden, {"kind": "classify", "where": "box"}, None, seed=2),
            "plain": lm}
