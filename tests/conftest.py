"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter: set before any kernel is defined."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Tiny Qwen2-VL checkpoints, one directory per distinct config, built once per session."""
    from valora.testing.checkpoints import build_qwen2_vl

    cache: dict[tuple, Path] = {}

    def make(**config) -> Path:
        key = tuple(sorted(config.items()))
        if key not in cache:
            d = tmp_path_factory.mktemp("qwen2vl")
            cache[key] = build_qwen2_vl(d / "model", **config)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory) -> Path:
    return model_factory(initializer_range=0.05)


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """PEFT adapters for a model directory, built once per (model, spec)."""
    from valora.testing.checkpoints import build_peft_adapter

    cache: dict[tuple, Path] = {}
    bases: dict[Path, torch.nn.Module] = {}

    def make(model_dir: Path, **spec) -> Path:
        key = (model_dir, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items())))
        if key not in cache:
            if model_dir not in bases:
                from transformers import AutoModelForImageTextToText

                bases[model_dir] = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
            out = tmp_path_factory.mktemp("adapter") / "adapter"
            cache[key] = build_peft_adapter(model_dir, out, base_model=bases[model_dir], **spec)
        return cache[key]

    return make
