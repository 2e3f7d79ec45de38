"""Start-up phases (engine/startup.py): each phase's seconds, Triton's builds charged to the phase they ran in, and
the engine's own report and "engine ready" line."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from valora.engine.host_pauses import COMPILES
from valora.engine.startup import StartupPhases


def test_phases_add_up_and_builds_are_charged_to_their_phase():
    phases = StartupPhases(torch.device("cpu"))
    with phases.phase("weights"):
        time.sleep(0.03)
    with phases.phase("kernel_builds"):
        COMPILES.start()  # as Triton's runtime hooks bracket a build (engine/host_pauses.py)
        time.sleep(0.02)
        COMPILES.stop()
    with phases.phase("weights"):  # a phase entered twice adds up
        time.sleep(0.01)
    time.sleep(0.02)  # in no phase
    report = phases.report()
    assert list(report) == ["weights", "kernel_builds", "other", "total"]
    assert report["weights"] >= 0.04 and report["kernel_builds"] >= 0.02 and report["other"] >= 0.02
    assert report["total"] == pytest.approx(sum(v for k, v in report.items() if k != "total"), abs=0.01)
    assert list(phases.compile_seconds) == ["kernel_builds"] and phases.compile_seconds["kernel_builds"] >= 0.02
    line = phases.summary()
    assert line.startswith(f"{report['total']:.1f} s: weights ") and "kernel builds 0.0 (Triton builds 0.0)" in line


def test_a_phase_that_raises_is_still_timed():
    phases = StartupPhases(torch.device("cpu"))
    with pytest.raises(RuntimeError), phases.phase("kv_cache"):
        raise RuntimeError("no memory left for the KV cache")
    assert "kv_cache" in phases.seconds


@pytest.mark.families("qwen2_vl")
def test_the_engine_reports_its_start_up(tiny_model, caplog):
    from valora.config import EngineConfig, LoRAConfig
    from valora.engine.llm_engine import LLMEngine

    start = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="valora.engine.llm_engine"):
        engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", device="cpu", enable_lora=True,
                                        lora=LoRAConfig(max_loras=2, max_lora_rank=8)))
    wall = time.perf_counter() - start
    report = engine.startup.report()
    assert list(report) == ["weights", "lora", "kv_cache", "other", "total"]  # no graphs, no warm-up on the CPU
    assert report["weights"] > 0 and report["total"] <= wall
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("engine ready")]
    assert len(ready) == 1 and "; start-up " in ready[0] and ", lora " in ready[0]
