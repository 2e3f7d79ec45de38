"""`valora bench simulate`: how throughput within the SLO and adapter loads scale from 1 to 64 GPUs under each
routing policy, from one GPU's measured costs; the one-GPU prediction is checked against the measured sweep.

For every GPU count and router the highest rate within the SLO is found by bisection on the rate per GPU (each
probe a full simulated point: warm-up, measured window, drain, the sweep's SLO rule); adapter loads per second
are compared at one common rate per GPU (`load_rate`), where every router still serves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from valora.bench.sim.calibrate import Sweep, calibrate, check_one_gpu, replica_config
from valora.bench.sim.cluster import ClusterWorkload, PromptModel, simulate
from valora.bench.sim.costs import QWEN2_VL_7B, ModelShape, StepCosts
from valora.bench.sim.replica import ReplicaConfig
from valora.bench.sim.routing import ROUTERS, make_router
from valora.bench.summary import SLO, summarize


@dataclass(frozen=True)
class StudyConfig:
    gpus: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    routers: tuple[str, ...] = ROUTERS
    workload: ClusterWorkload = ClusterWorkload()
    load_rate: float = 8.0  # req/s per GPU at which adapter loads are compared
    tolerance: float = 0.25  # req/s per GPU: the bisection stops within this
    max_rate: float = 64.0  # req/s per GPU: the search gives up above this
    affinity_max_load: int | None = None  # requests outstanding on a holder before affinity spills (max_num_seqs)
    drain_s: float = 120.0


@dataclass
class Simulator:
    costs: StepCosts
    prompts: PromptModel
    replica: ReplicaConfig
    slo: SLO
    shape: ModelShape = QWEN2_VL_7B

    def point(self, gpus: int, router: str, rate: float, config: StudyConfig) -> dict:
        """One simulated point at `rate` req/s in total: the bench summary plus adapter loads and residency."""
        w = config.workload
        reqs = w.requests(gpus, rate, self.prompts, self.shape)
        max_load = config.affinity_max_load or self.replica.max_num_seqs
        sim = simulate(reqs, gpus, make_router(router, max_load), self.costs, self.replica,
                       until_s=w.warmup_s + w.duration_s + config.drain_s)
        summary = summarize(sim.records(), self.slo)
        window = (w.warmup_s, w.warmup_s + w.duration_s)

        def per_s(times: list[float]) -> float:
            return sum(window[0] <= t < window[1] for t in times) / w.duration_s

        measured = [r for r in reqs if not r.warmup]
        return {
            "gpus": gpus, "router": router, "rate": rate, "requests": len(reqs),
            "slo_attainment": summary["slo_attainment"], "goodput_rps": summary["goodput_rps"],
            "throughput_rps": summary["throughput_rps"], "ttft_p90_s": summary["ttft_s"]["p90"],
            "tpot_mean_s": summary["tpot_s"]["mean"],
            "slot_loads_per_s": sum(per_s(r.stats.slot_loads) for r in sim.replicas),
            "disk_loads_per_s": sum(per_s(r.stats.disk_loads) for r in sim.replicas),
            "resident_share": sum(bool(r.adapter_was_resident) for r in measured) / max(1, len(measured)),
            "served_per_replica": [r.stats.served for r in sim.replicas],
        }

    def highest_rate(self, gpus: int, router: str, config: StudyConfig,
                     log: Callable[[str], None] = lambda _: None) -> tuple[float | None, dict | None]:
        """The highest rate per GPU within the SLO (to `tolerance`), and the point simulated there."""
        def meets(per_gpu: float) -> dict | None:
            p = self.point(gpus, router, per_gpu * gpus, config)
            log(f"  {gpus} GPU, {router}, {per_gpu:g} req/s/GPU: SLO {p['slo_attainment']:.3f}")
            return p if p["slo_attainment"] is not None and p["slo_attainment"] >= self.slo.attainment else None

        lo, hi, best = 4.0, None, None
        while (best := meets(lo)) is None:
            hi, lo = lo, lo / 2
            if lo < config.tolerance:
                return None, None
        while hi is None:
            probe = lo * 2
            if probe > config.max_rate:
                return lo, best
            p = meets(probe)
            if p is None:
                hi = probe
            else:
                lo, best = probe, p
        while hi - lo > config.tolerance:
            mid = (lo + hi) / 2
            p = meets(mid)
            if p is None:
                hi = mid
            else:
                lo, best = mid, p
        return lo, best


def run_study(results: Path, sweep_dir: Path, config: StudyConfig, fit_rates: tuple[float, ...],
              log: Callable[[str], None] = print) -> dict:
    t0 = time.perf_counter()
    costs, prompts, sweep = calibrate(results, sweep_dir, fit_rates)
    sim = Simulator(costs, prompts, replica_config(sweep), sweep.slo)
    log(f"costs: prefill step {costs.prefill_step_ms:.1f} ms + {costs.image_ms:.1f} ms per image "
        f"+ {costs.waiting_ms * 1e3:.1f} us per waiting request per step; disk loads at {costs.load_gbps:.2f} GB/s")
    check = check_one_gpu(costs, prompts, sweep, sim.shape)
    rows = []
    for gpus in config.gpus:
        for router in config.routers:
            if gpus == 1 and router != config.routers[0]:
                rows.append({**rows[-1], "router": router})  # one GPU: nothing to route
                continue
            per_gpu, at_max = sim.highest_rate(gpus, router, config, log)
            at_load = sim.point(gpus, router, config.load_rate * gpus, config)
            rows.append({"gpus": gpus, "router": router, "max_rate_per_gpu": per_gpu,
                         "max_rate": None if per_gpu is None else per_gpu * gpus, "at_max_rate": at_max,
                         "at_load_rate": at_load})
            log(f"{gpus} GPUs, {router}: {per_gpu} req/s per GPU within the SLO; at {config.load_rate:g} req/s/GPU "
                f"{at_load['slot_loads_per_s']:.1f} slot loads/s, {at_load['resident_share']:.0%} resident")
    measured_max = _measured_max_rate(sweep)
    one_gpu = next(r for r in rows if r["gpus"] == 1) if 1 in config.gpus else None
    return {
        "sweep": str(sweep_dir), "sweep_runs": [{k: run[k] for k in ("started", "commit", "device")}
                                                for run in json.loads((sweep_dir / "run.json").read_text())["runs"]],
        "fit_rates": list(fit_rates), "costs": costs.to_dict(), "prompts": asdict(prompts),
        "replica": asdict(sim.replica), "slo": asdict(sim.slo), "study": _study_dict(config),
        "check_one_gpu": {"points": check, "measured_max_rate": measured_max,
                          "simulated_max_rate": one_gpu["max_rate"] if one_gpu else None},
        "rows": rows, "elapsed_s": time.perf_counter() - t0,
    }


def _measured_max_rate(sweep: Sweep) -> dict:
    """The highest swept rate within the SLO and the next swept rate (which misses it), if any."""
    rates = sorted((p.key.rate, summarize(p.records, sweep.slo)["slo_attainment"] or 0.0) for p in sweep.points)
    best, above = None, None
    for rate, attained in rates:
        if attained < sweep.slo.attainment:
            above = rate
            break
        best = rate
    return {"within": best, "next_missing": above}


def _study_dict(config: StudyConfig) -> dict:
    d = asdict(config)
    d["workload"] = asdict(config.workload)
    return d
