"""GPU slots are an LRU over the host cache; slots in use by the step are never evicted."""

from __future__ import annotations

import pytest

from tests.conftest import LM_LINEARS
from valora import LoRARequest
from valora.config import EngineConfig, LoRAConfig
from valora.engine.llm_engine import LLMEngine
from valora.testing.checkpoints import peft_target_regex


@pytest.fixture(scope="module")
def manager(tiny_model, adapter_factory):
    engine = LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", device="cpu", enable_lora=True,
                                    lora=LoRAConfig(max_loras=2, max_cpu_loras=3, max_lora_rank=8)))
    m = engine.lora_manager
    for i in range(5):
        path = adapter_factory(tiny_model, r=2 + i, target_modules=peft_target_regex(LM_LINEARS[i:]), seed=50 + i)
        m.register(LoRARequest(f"x{i}", i + 1, str(path)))
    return m


def test_slots_are_lru_and_protect_the_step(manager):
    first = manager.activate(["x0", "x1"])
    assert sorted(first.values()) == [0, 1]
    again = manager.activate(["x1", "x2"])  # x0 is least recently used and not needed: evicted
    assert again["x1"] == first["x1"] and again["x2"] == first["x0"]
    with pytest.raises(RuntimeError, match="only 2 slots"):
        manager.activate(["x0", "x1", "x2"])


def test_slot_contents_follow_the_adapter(manager):
    slots = manager.activate(["x3", "x4"])
    layer = manager.layers["model.language_model.layers.0.mlp.down_proj"]
    adapter = manager._host_get(manager.requests["x4"])
    a, b = adapter.weights[("model.language_model.layers.0.mlp.down_proj", None)]
    s = slots["x4"]
    assert int(layer.lora_ranks[0, s]) == a.shape[0] == 6
    assert (layer.lora_a[s, : a.shape[0]] == a).all() and (layer.lora_b[s, :, : a.shape[0]] == b).all()
    qkv = manager.layers["model.language_model.layers.0.self_attn.qkv_proj"]
    assert qkv.lora_ranks[:, s].tolist() == [0, 0, 0]  # x4 targets only the layers after v_proj
    assert manager.scalings[s].item() == pytest.approx(2.0)  # lora_alpha = 2r


def test_host_cache_reloads_evicted_adapters(manager):
    before = manager.stats.disk_loads
    for name in ["x0", "x1", "x2", "x3", "x4", "x0"]:
        manager.activate([name])
    assert len(manager.host) <= 3 and manager.stats.disk_loads > before
