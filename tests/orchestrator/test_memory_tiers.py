"""Acceptance (orchestrator 4): 100 adapters through 8 GPU slots and a 32-adapter host cache, 300 requests in
random order: every answer is the one a roomy host cache gives, and the step loop never reads from disk
(host misses are reloaded by the loader thread while other requests run)."""

from __future__ import annotations

import random
import time

import pytest
import torch

from valora import LoRARequest, SamplingParams
from valora.config import EngineConfig, LoRAConfig, SchedulerConfig
from valora.engine.inproc import InprocEngine
from valora.testing.checkpoints import peft_target_regex, save_random_adapter

pytestmark = pytest.mark.families("qwen2_vl")


def _run(model, adapters, requests, max_cpu_loras):
    engine = InprocEngine(EngineConfig(
        model=str(model), dtype="float32", device="cpu", enable_lora=True,
        lora=LoRAConfig(max_loras=8, max_cpu_loras=max_cpu_loras, max_lora_rank=8),
        scheduler=SchedulerConfig(max_num_seqs=32, policy="slora"),
    ))
    for lora in adapters:  # registration validates every adapter up front (disk I/O outside the step loop)
        engine.core.add_lora(lora)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    for rid, (prompt, lora) in enumerate(requests):
        engine.add_request(str(rid), prompt, params, lora)
    outputs, step_times = {}, []
    while engine.has_unfinished_requests():
        t = time.perf_counter()
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id)] = out.outputs[0].token_ids
        step_times.append(time.perf_counter() - t)
    return outputs, engine.core.lora_manager.stats, step_times


def test_hundred_adapters_through_two_tiers(tiny_model, tmp_path):
    adapters = [
        LoRARequest(f"a{i}", i + 1, str(save_random_adapter(
            tiny_model, tmp_path / f"a{i}", r=(2, 4, 8)[i % 3], seed=i, std=0.1, dtype=torch.float32,
            target_modules=peft_target_regex(("q_proj", "v_proj", "up_proj") if i % 2 else ("o_proj", "down_proj")),
        )))
        for i in range(100)
    ]
    rng = random.Random(3)
    words = ["red", "car", "dog", "runs", "tall", "building", "green", "grass"]
    requests = [(" ".join(rng.choice(words) for _ in range(rng.randint(2, 8))), rng.choice(adapters))
                for _ in range(300)]
    roomy, roomy_stats, _ = _run(tiny_model, adapters, requests, max_cpu_loras=100)
    tiered, stats, step_times = _run(tiny_model, adapters, requests, max_cpu_loras=32)
    assert len(tiered) == 300 and tiered == roomy
    assert roomy_stats.background_loads == 0
    assert stats.host_evictions > 0 and stats.background_loads > 0  # misses happened, served off the loop
    assert stats.blocking_loads == 0  # and the step loop itself never touched the disk
    assert stats.slot_evictions > 0 and stats.slot_hits > 0
