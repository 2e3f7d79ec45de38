"""The GPU sweep's config covers what issues 12 and 19 ask, with the 7B shapes the other benchmarks use; a model and
its adapters are built from a config when missing, and only then, sharing weight files where asked."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import QWEN2_VL_7B
from valora.bench.server import AdapterSpec, ModelSpec
from valora.bench.sweep import SweepConfig, plan, warm_up_plan

E2E = Path(__file__).parents[2] / "benchmarks" / "e2e_sweep.yaml"


def test_e2e_sweep_config_covers_the_acceptance():
    config = SweepConfig.load(E2E)
    assert config.server.policies == ("valora", "slora", "punica", "dlora")
    assert {k: config.model.build[k] for k in QWEN2_VL_7B} == QWEN2_VL_7B
    assert config.model.build["max_pixels"] == 448 * 448
    adapters = config.model.adapters
    assert adapters.count == 16 and set(adapters.ranks) == {8, 16, 32, 64} and len(adapters.targets) == 7
    vqa, video, *scenarios = config.workloads
    assert (vqa.mix, len(vqa.rates) >= 4, len(vqa.skews)) == ("vqa", True, 2)
    assert (video.mix, len(video.rates) >= 4, len(video.skews)) == ("video", True, 1)
    points = plan(config)
    scenario_points = sum(2 * len(w.rates) * len(w.skews) for w in scenarios)
    assert len(points) == 4 * (len(vqa.rates) * 2 + len(video.rates)) + scenario_points
    assert len({k.stem for k, _, _ in points}) == len(points)
    assert config.timeline["rate"] in vqa.rates
    some = plan(config, ("valora", "dlora"), ("vqa",), ("zipf:1.0",))  # the filters of `valora bench sweep`
    assert [(k.policy, k.workload, k.skew) for k, _, _ in some] == [("valora", "vqa", "zipf1")] * len(vqa.rates) + \
        [("dlora", "vqa", "zipf1")] * len(vqa.rates)


def test_scenarios_of_issue_19():
    """64 adapters over 8 slots against 8 over 8, Zipf and uniform; 1, 100 and 1,000 adapters of mixed ranks on
    the same load; valora and slora, at the same rates."""
    config = SweepConfig.load(E2E)
    work = {w.name: w for w in config.workloads}
    slots, scale = config.servers["slots"], config.servers["scale"]
    assert slots.adapters.count == 64 and slots.args[slots.args.index("--max-loras") + 1] == "8"
    assert scale.adapters.count == 1000 and len(set(scale.adapters.ranks)) > 1
    assert scale.adapters.distinct < 100  # a few weight files, linked
    for name, server, n, reference in (("slots-a8", "slots", 8, None), ("slots-a64", "slots", 64, "slots-a8"),
                                       ("scale-a1", "scale", 1, None), ("scale-a100", "scale", 100, "scale-a1"),
                                       ("scale-a1000", "scale", 1000, "scale-a1")):
        w = work[name]
        assert (w.server, w.adapters, w.reference, w.policies) == (server, n, reference, ("valora", "slora"))
        assert w.rates == work[reference or name].rates and w.skews == work[reference or name].skews
    assert set(work["slots-a64"].skews) == {"zipf:1.0", "uniform"}
    chosen = plan(config, workloads=("slots-a8", "slots-a64"))  # one command per scenario
    assert {k.policy for k, _, _ in chosen} == {"valora", "slora"} and len(chosen) == 16


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
    many = spec.prepare(AdapterSpec(count=120, ranks=(4, 2), targets=("q_proj",), dtype="float32", distinct=4), "many")
    assert list(many)[:2] == ["lora000", "lora001"] and len(many) == 120
    assert all(p.parent == tmp_path / "model-adapters-many" for p in many.values())
    assert sum(not (p / "adapter_model.safetensors").is_symlink() for p in many.values()) == 4
    assert (many["lora118"] / "adapter_model.safetensors").read_bytes() == \
        (many["lora002"] / "adapter_model.safetensors").read_bytes()
    assert '"r": 4' in (many["lora118"] / "adapter_config.json").read_text()


def test_warm_up_replays_each_skew_the_points_use():
    """A server warms up at the top rate, then the lowest, under every skew its points use (a skew is what makes a
    policy merge and sets the adapters per step, and a bucket's first use builds its graph)."""
    config = SweepConfig.load(E2E)
    vqa = config.workloads[0]
    top, low = max(vqa.rates), min(vqa.rates)
    points = [p for p in plan(config, ("valora",), ("vqa",)) if p[0].rate in (top, low)]
    assert warm_up_plan(points) == [(vqa, top, "zipf:1.0"), (vqa, top, "hot:0.8"), (vqa, low, "zipf:1.0"),
                                    (vqa, low, "hot:0.8")]
    uniform = plan(config, ("slora",), ("scale-a1",))
    spec = uniform[0][1]
    assert warm_up_plan(uniform) == [(spec, max(spec.rates), "uniform"), (spec, min(spec.rates), "uniform")]
