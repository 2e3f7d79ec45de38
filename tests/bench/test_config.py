"""The GPU sweep's config covers what issue 12 asks, with the 7B shapes the other benchmarks use; a model and its
adapters are built from a config when missing, and only then."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import QWEN2_VL_7B
from valora.bench.server import AdapterSpec, ModelSpec
from valora.bench.sweep import SweepConfig, plan

E2E = Path(__file__).parents[2] / "benchmarks" / "e2e_sweep.yaml"


def test_e2e_sweep_config_covers_the_acceptance():
    config = SweepConfig.load(E2E)
    assert config.server.policies == ("valora", "slora", "punica", "dlora")
    assert {k: config.model.build[k] for k in QWEN2_VL_7B} == QWEN2_VL_7B
    assert config.model.build["max_pixels"] == 448 * 448
    adapters = config.model.adapters
    assert adapters.count == 16 and set(adapters.ranks) == {8, 16, 32, 64} and len(adapters.targets) == 7
    vqa, video = config.workloads
    assert (vqa.mix, len(vqa.rates) >= 4, len(vqa.skews)) == ("vqa", True, 2)
    assert (video.mix, len(video.rates) >= 4, len(video.skews)) == ("video", True, 1)
    points = plan(config)
    assert len(points) == 4 * (len(vqa.rates) * 2 + len(video.rates))
    assert len({k.stem for k, _, _ in points}) == len(points)
    assert config.timeline["rate"] in vqa.rates
    some = plan(config, ("valora", "dlora"), ("vqa",), ("zipf:1.0",))  # the filters of `valora bench sweep`
    assert [(k.policy, k.workload, k.skew) for k, _, _ in some] == [("valora", "vqa", "zipf1")] * len(vqa.rates) + \
        [("dlora", "vqa", "zipf1")] * len(vqa.rates)


def test_model_and_adapters_built_once(tmp_path):
    spec = ModelSpec(tmp_path / "model", build={"family": "qwen2_vl", "initializer_range": 0.05},
                     adapters=AdapterSpec(count=3, ranks=(4, 2), targets=("q_proj", "v_proj"), dtype="float32"))
    adapters = spec.prepare()
    assert list(adapters) == ["lora00", "lora01", "lora02"]
    assert (tmp_path / "model" / "config.json").exists()
    assert all((p / "adapter_model.safetensors").exists() for p in adapters.values())
    assert '"r": 2' in (adapters["lora01"] / "adapter_config.json").read_text()
    stamp = (adapters["lora00"] / "adapter_model.safetensors").stat().st_mtime_ns
    assert spec.prepare() == adapters
    assert (adapters["lora00"] / "adapter_model.safetensors").stat().st_mtime_ns == stamp
