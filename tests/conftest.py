"""Shared fixtures. Without CUDA, Triton kernels run in the interpreter: set before any kernel is defined.

Tests that take the `family` fixture (directly or through `tiny_model`) run once per supported model family;
`@pytest.mark.families(...)` narrows a test or module to some of them.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: one thread is faster than a pool, and immune to busy neighbours on a shared CI box
# (a contended 2-thread pool turned a 10x64 matmul into 15 ms).
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from valora.testing.families import FAMILIES, LM_LINEARS, TinyFamily  # noqa: E402, F401 (LM_LINEARS: for tests)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "families(*names): run only for these model families")


def pytest_generate_tests(metafunc) -> None:
    if "family" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("families")
        metafunc.parametrize("family", marker.args if marker else list(FAMILIES), indirect=True, scope="session")


@pytest.fixture(scope="session")
def family(request) -> TinyFamily:
    return FAMILIES[request.param]


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Tiny checkpoints, one directory per (family, config), built once per session."""
    from valora.testing.checkpoints import build_model

    cache: dict[tuple, Path] = {}

    def make(family: str, **config) -> Path:
        key = (family, tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items())))
        if key not in cache:
            d = tmp_path_factory.mktemp(family)
            cache[key] = build_model(family, d / "model", **config)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory, family) -> Path:
    return model_factory(family.name, initializer_range=0.05)


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
