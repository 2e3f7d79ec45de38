"""Adapter tiers: GPU slots are an LRU over the host cache; slots the step needs are never evicted; host misses
are reloaded in the background, never on the step loop; pinned adapters stay."""

from __future__ import annotations

import time

import pytest

from tests.conftest import LM_LINEARS
from valora import LoRARequest
from valora.config import EngineConfig, LoRAConfig
from valora.engine.llm_engine import LLMEngine
from valora.testing.checkpoints import peft_target_regex


@pytest.fixture()
def manager(tiny_model, adapter_factory):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", device="cpu", enable_lora=True,
                                    lora=LoRAConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=8)))
    m = engine.lora_manager
    for i in range(5):
        path = adapter_factory(tiny_model, r=2 + i, target_modules=peft_target_regex(LM_LINEARS[i:]), seed=50 + i)
        m.register(LoRARequest(f"x{i}", i + 1, str(path)))
    return m


def _wait_ready(m, name: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not m.ready(name):
        assert time.monotonic() < end, f"{name} never became ready"
        time.sleep(0.01)


def test_slots_are_lru_and_protect_the_step(manager):
    for name in ("x0", "x1", "x2"):
        _wait_ready(manager, name)
    first = manager.activate(["x0", "x1"])
    assert sorted(first.values()) == [0, 1]
    again = manager.activate(["x1", "x2"])  # x0 is least recently used and not needed: evicted
    assert again["x1"] == first["x1"] and again["x2"] == first["x0"]
    with pytest.raises(RuntimeError, match="only 2 slots"):
        manager.activate(["x0", "x1", "x2"])


def test_slot_contents_follow_the_adapter(manager):
    _wait_ready(manager, "x3")
    slots = manager.activate(["x3", "x4"])
    layer = manager.layers["model.language_model.layers.0.mlp.down_proj"]
    a, b = manager.adapter("x4").weights[("model.language_model.layers.0.mlp.down_proj", None)]
    s = slots["x4"]
    assert int(layer.lora_ranks[0, s]) == a.shape[0] == 6
    assert (layer.lora_a[s, : a.shape[0]] == a).all() and (layer.lora_b[s, :, : a.shape[0]] == b).all()
    qkv = manager.layers["model.language_model.layers.0.self_attn.qkv_proj"]
    assert qkv.lora_ranks[:, s].tolist() == [0, 0, 0]  # x4 targets only the layers after v_proj
    assert manager.scalings[s].item() == pytest.approx(2.0) == -manager.neg_scalings[s].item()  # lora_alpha = 2r


def test_host_misses_reload_in_the_background(manager):
    assert len(manager.host) == 3 and "x0" not in manager.host  # five registered, three kept
    before = manager.stats.disk_loads
    assert not manager.ready("x0")  # starts the reload and returns at once
    _wait_ready(manager, "x0")
    assert manager.stats.background_loads == 1 and manager.stats.disk_loads == before + 1
    manager.activate(["x0"])
    assert manager.stats.blocking_loads == 0


def test_pinned_adapters_stay(manager):
    manager.pin("x4")
    for name in ("x0", "x1", "x2", "x3"):
        _wait_ready(manager, name)
        manager.activate([name, "x4"])
    assert "x4" in manager.host and "x4" in manager.slot_lru
    with pytest.raises(ValueError, match="must stay free"):
        manager.pin("x3")
