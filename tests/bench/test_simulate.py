"""`valora bench simulate`: the step costs read from the measured results, the invariants of the discrete-event
model (every request served once with all its tokens), routing by adapter affinity against round robin on a
skewed load, and the one-GPU simulation against the measured sweep it was calibrated on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from valora.bench.sim.calibrate import Moments, Sweep, check_one_gpu, fit_prompt_model, replica_config
from valora.bench.sim.cluster import ClusterWorkload, PromptModel, simulate
from valora.bench.sim.costs import QWEN2_VL_7B, StepCosts
from valora.bench.sim.replica import Replica, ReplicaConfig, SimRequest
from valora.bench.sim.routing import AdapterAffinity, LeastLoaded, make_router
from valora.bench.sim.study import Simulator, StudyConfig

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


@pytest.fixture(scope="module")
def costs() -> StepCosts:
    """The measured costs with the serving costs fitted on the sweep, as the committed study has them."""
    fitted = json.loads((RESULTS / "simulate_h100.json").read_text())["costs"]
    return replace(StepCosts.from_results(RESULTS),
                   **{k: fitted[k] for k in ("prefill_step_ms", "image_ms", "waiting_ms")})


def test_costs_reproduce_the_measured_rows(costs):
    speed = json.loads((RESULTS / "engine_speed_h100.json").read_text())
    for row in speed["decode"]:
        if not row["adapters"]:
            assert costs.decode_step_ms(row["batch"], 0) == pytest.approx(row["valora_ms"])
    for row in speed["prefill"]:
        assert costs.prompt_ms(row["tokens"]) == pytest.approx(row["valora_ms"])
    assert costs.decode_step_ms(32, 32) > costs.decode_step_ms(32, 8) > costs.decode_step_ms(32, 0)
    assert costs.lora_rank_factor > 1  # rank-64 adapters cost more than the rank-16 rows measured
    assert 0 < costs.prompt_ms(100) < costs.prompt_ms(512)
    assert costs.load_ms(QWEN2_VL_7B.adapter_bytes(64), from_disk=True) > costs.load_ms(
        QWEN2_VL_7B.adapter_bytes(8), from_disk=True) > costs.load_ms(QWEN2_VL_7B.adapter_bytes(8), from_disk=False)


def _run(costs, gpus: int, router: str, rate: float, duration: float = 10.0):
    w = ClusterWorkload(duration_s=duration, warmup_s=2.0, adapters_per_gpu=16)
    reqs = w.requests(gpus, rate, PromptModel(), QWEN2_VL_7B)
    return simulate(reqs, gpus, make_router(router, 64), costs, ReplicaConfig(), until_s=600.0)


@pytest.mark.parametrize("router", ["affinity", "least_loaded", "round_robin"])
def test_every_request_is_served_once_with_all_its_tokens(costs, router):
    sim = _run(costs, gpus=4, router=router, rate=30.0)
    reqs = sim.requests
    assert [r.index for r in reqs] == list(range(len(reqs)))
    assert all(r.finished_s is not None and r.arrival_s < r.first_token_s <= r.finished_s for r in reqs)
    assert sum(rep.stats.served for rep in sim.replicas) == len(reqs)
    assert sum(rep.stats.tokens for rep in sim.replicas) == sum(r.output_tokens for r in reqs)
    for rep in sim.replicas:
        assert not rep.waiting and not rep.running and not rep.busy
        assert rep.stats.served == sum(r.replica == rep.index for r in reqs)
        assert len(rep.slots) <= rep.config.max_loras and len(rep.host) <= rep.config.max_cpu_loras
        assert len(rep.stats.disk_loads) <= len(rep.stats.slot_loads)
    records = sim.records()
    assert len(records) == len(reqs) and all(r.ok for r in records)


def test_a_slot_in_use_is_never_taken(costs):
    """One slot, two adapters: the second request waits for the first to finish (its adapter cannot be evicted
    mid-request), then its adapter is loaded from disk (the host cache holds one adapter) and it runs."""
    nbytes = QWEN2_VL_7B.adapter_bytes(64)
    reqs = [SimRequest(0, 0.0, False, "vqa", "a", nbytes, 300, 1, 20),
            SimRequest(1, 0.001, False, "vqa", "b", nbytes, 300, 1, 20)]
    config = ReplicaConfig(max_loras=1, max_cpu_loras=1)
    (rep,) = simulate(reqs, 1, make_router("round_robin", 64), costs, config, until_s=60.0).replicas
    first, second = reqs
    load_s = costs.load_ms(nbytes, from_disk=True) / 1e3
    assert second.first_token_s > first.finished_s + load_s
    assert len(rep.stats.slot_loads) == len(rep.stats.disk_loads) == 2


def test_overload_ends_in_timeouts_not_lost_requests(costs):
    w = ClusterWorkload(duration_s=10.0, warmup_s=0.0)
    reqs = w.requests(1, 40.0, PromptModel(), QWEN2_VL_7B)
    sim = simulate(reqs, 1, make_router("round_robin", 64), costs, ReplicaConfig(), until_s=15.0)
    statuses = [r.status for r in sim.records()]
    assert len(statuses) == len(reqs) and "timeout" in statuses and "ok" in statuses


def test_affinity_beats_round_robin_on_a_skewed_load(costs):
    by = {router: _run(costs, gpus=4, router=router, rate=4 * 10.0, duration=20.0)
          for router in ("affinity", "round_robin")}
    loads = {k: sum(len(r.stats.slot_loads) for r in v.replicas) for k, v in by.items()}
    resident = {k: sum(bool(r.adapter_was_resident) for r in v.requests) / len(v.requests) for k, v in by.items()}
    latency = {k: sum(r.finished_s - r.arrival_s for r in v.requests) / len(v.requests) for k, v in by.items()}
    assert loads["affinity"] * 3 < loads["round_robin"]
    assert resident["affinity"] > resident["round_robin"] + 0.2
    assert latency["affinity"] < latency["round_robin"], (loads, resident, latency)
    served = [r.stats.served for r in by["affinity"].replicas]
    assert min(served) > 0.5 * max(served)  # the hot adapters spill over instead of piling on one replica


def test_affinity_prefers_a_holder_until_it_is_full(costs):
    replicas = [Replica(i, ReplicaConfig(), costs) for i in range(3)]
    req = SimRequest(0, 0.0, False, "vqa", "hot", QWEN2_VL_7B.adapter_bytes(8), 300, 1, 10)
    replicas[1].enqueue(req, 0.0)
    assert replicas[1].holds("hot") and not replicas[0].holds("hot")
    assert AdapterAffinity(max_load=64).choose("hot", replicas) is replicas[1]
    assert AdapterAffinity(max_load=1).choose("hot", replicas) is not replicas[1]  # the holder is full: spill
    assert AdapterAffinity(max_load=64).choose("cold", replicas) is not replicas[1]  # no holder: least loaded
    router = LeastLoaded()
    assert [router.choose("x", replicas).index for _ in range(4)] == [0, 2, 0, 2]  # ties taken in turn


def test_one_gpu_simulation_matches_the_measured_sweep(costs):
    """The calibration check of docs/benchmarks.md: on one GPU, the simulated goodput within 15% of the measured
    one at every swept rate within the SLO, and the simulated capacity between the highest swept rate within the
    SLO and the next one."""
    sweep = Sweep.load(RESULTS / "e2e_slice1")
    prompts = fit_prompt_model(sweep)
    assert prompts.tokens_per_word == pytest.approx(1.2, abs=0.05)
    rows = check_one_gpu(costs, prompts, sweep)
    assert [r["rate"] for r in rows] == [2, 4, 8, 12, 16]
    for r in rows:
        m, s = r["measured"], r["simulated"]
        if m["slo_attainment"] >= sweep.slo.attainment:
            assert s["goodput_rps"] == pytest.approx(m["goodput_rps"], rel=0.15)
        assert s["steps_per_s"] == pytest.approx(m["steps_per_s"], rel=0.15)
    sim = Simulator(costs, prompts, replica_config(sweep), sweep.slo)
    capacity, _ = sim.highest_rate(1, "round_robin", StudyConfig(tolerance=1.0))
    assert 12 <= capacity < 16


def test_measured_moments_of_a_point():
    sweep = Sweep.load(RESULTS / "e2e_slice1")
    by_rate = {p.key.rate: Moments.measured(p) for p in sweep.points}
    assert by_rate[4].steps_per_s == pytest.approx(84.4, abs=0.5)
    assert by_rate[16].mean_batch == pytest.approx(60.9, abs=0.5)
    assert by_rate[4].mean_batch < by_rate[8].mean_batch < by_rate[12].mean_batch
