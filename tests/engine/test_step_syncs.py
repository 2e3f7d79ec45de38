"""Preparing a step never waits for the device: the batch's tensors and the vision pass's inputs go over in
non-blocking copies from pinned memory (models/layers/uploads.py), so the host can build step n+1 while step n
runs. Checked with PyTorch's sync debug mode, which raises on any synchronising call; needs a GPU."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, SamplingParams
from valora.testing.images import random_image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.families("qwen2_vl", "llava")
def test_batch_preparation_never_synchronises(family, tiny_model, monkeypatch):
    llm = LLM(str(tiny_model), dtype="bfloat16", device="cuda", embed_cache_mb=0, gpu_memory_utilization=0.3)
    runner = llm.engine.core.runner
    model = runner.model
    prepared = []

    def strict(fn, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    for obj, name in ((runner, "prepare"), (model, "prepare_vision")):
        real = getattr(obj, name)
        monkeypatch.setattr(obj, name, lambda *a, _real=real, _name=name, **k: prepared.append(_name) or
                            strict(_real, *a, **k))
    prompts = [{"prompt": f"{family.image_prompt} what is this ?",
                "multi_modal_data": {"image": random_image(56, 84, seed=1)}}, "a text prompt"]
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert "prepare_vision" in prepared and prepared.count("prepare") >= 4  # prefill and decode steps
