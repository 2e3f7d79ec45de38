"""Calibration of the simulator on a measured one-GPU sweep, and the check of its one-GPU predictions against it.

The engine benchmark times steps in isolation; serving adds what it cannot see (eager prefill steps with image
preprocessing, the scheduler scanning its queue). Those are three parameters of `StepCosts`, fitted on the
sweep's server-side counters only: at each fitting rate, the simulated engine must run as many steps per second,
with as many sequences in them, as `/metrics` recorded (`fit_step_costs`). Prompt tokens per request come from
the server's counts (`fit_prompt_model`). What the clients saw (latency, TTFT, TPOT, SLO attainment, goodput) is
never fitted: `check_one_gpu` compares it with the simulation, point by point.

The default fitting rates are the points where the `valora` policy stayed unmerged throughout (at 2 req/s it
merged twice, which the simulator does not model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from valora.bench.results import Point, load_points
from valora.bench.sim.cluster import ClusterResult, ClusterWorkload, PromptModel, simulate
from valora.bench.sim.costs import QWEN2_VL_7B, ModelShape, StepCosts
from valora.bench.sim.replica import Replica, ReplicaConfig
from valora.bench.sim.routing import RoundRobin
from valora.bench.summary import SLO, summarize


@dataclass(frozen=True)
class Sweep:
    """The measured one-GPU points the simulator is calibrated and checked on."""

    points: list[Point]
    slo: SLO
    config: dict

    @classmethod
    def load(cls, root: Path, policy: str = "valora", workload: str = "vqa", skew: str = "zipf1") -> Sweep:
        runs = json.loads((root / "run.json").read_text())["runs"]
        config = runs[0]["config"]
        points = [p for p in load_points(root) if (p.key.policy, p.key.workload, p.key.skew) == (policy, workload,
                                                                                                   skew)]
        if not points:
            raise ValueError(f"{root} has no {policy} points of {workload} under {skew}")
        return cls(points, SLO(**config["slo"]), config)


def _skew_text(label: str) -> str:
    if label.startswith("zipf"):
        return f"zipf:{label[4:]}"
    if label.startswith("hot"):
        return f"hot:{label[3:]}"
    return label


def fit_prompt_model(sweep: Sweep, image_tokens: int = 256) -> PromptModel:
    """Tokens the server counted for each request, less its images' tokens, against its words (least squares)."""
    words, tokens = [], []
    for p in sweep.points:
        (window,) = point_workload(p).windows(1, p.key.rate)
        for req, rec in zip(window.requests(), p.records):
            if rec.prompt_tokens:
                words.append(len(req.prompt.split()))
                tokens.append(rec.prompt_tokens - image_tokens * len(req.images))
    (intercept, slope), *_ = np.linalg.lstsq(np.c_[np.ones(len(words)), words], np.array(tokens, float), rcond=None)
    return PromptModel(float(intercept), float(slope), image_tokens)


@dataclass(frozen=True)
class Moments:
    """What the server's `/metrics` says about a point's steps: steps per second and the mean batch, both over
    the time the engine had requests running."""

    steps_per_s: float
    mean_batch: float

    @classmethod
    def measured(cls, point: Point) -> Moments:
        s = point.samples
        t = np.array([x.t for x in s])
        steps = np.array([sum(x.mode_steps.values()) for x in s])
        running = np.array([x.running or 0 for x in s])
        busy = (running[1:] > 0) & (running[:-1] > 0)
        dt = np.diff(t)[busy]
        return cls(float(np.diff(steps)[busy].sum() / dt.sum()), float((running[1:][busy] * dt).sum() / dt.sum()))

    @classmethod
    def simulated(cls, replica: Replica) -> Moments:
        st = replica.stats
        return cls(st.steps / st.busy_s, st.running_s / st.busy_s)


def point_workload(point: Point) -> ClusterWorkload:
    m = point.meta
    return ClusterWorkload(mix=m["mix"], skew=_skew_text(point.key.skew), adapters_per_gpu=len(m["adapters"]),
                           duration_s=m["duration_s"], warmup_s=m["warmup_s"], seed=m["seed"])


def simulate_point(point: Point, costs: StepCosts, prompts: PromptModel, config: ReplicaConfig, drain_s: float,
                   shape: ModelShape = QWEN2_VL_7B) -> ClusterResult:
    """The one-GPU simulation of a measured point: the same requests, the same server flags."""
    w = point_workload(point)
    reqs = w.requests(1, point.key.rate, prompts, shape)
    return simulate(reqs, 1, RoundRobin(), costs, config, until_s=w.warmup_s + w.duration_s + drain_s)


def fit_step_costs(sweep: Sweep, costs: StepCosts, prompts: PromptModel, rates: tuple[float, ...]
                   ) -> tuple[float, float, float]:
    """(`prefill_step_ms`, `image_ms`, `waiting_ms`) such that the simulated engine runs as many steps per second,
    with as many sequences in them, as the measured one at each of `rates` (Nelder-Mead on the squared log
    ratios). The clients' latencies and SLO attainment are left out of the fit: they are what the check tests."""
    from scipy.optimize import minimize

    points = [p for p in sweep.points if p.key.rate in rates]
    if len(points) < 2:
        raise ValueError(f"fitting the step costs needs two or more sweep points; {rates} matched {len(points)}")
    config, drain = replica_config(sweep), float(sweep.config.get("drain_timeout_s", 120.0))
    measured = [Moments.measured(p) for p in points]
    # Start from the engine benchmark's one-image TTFT split evenly between the step and its image.
    image_request = (costs.ttft_ms or 50.0) - costs.prompt_ms(costs.ttft_prompt_tokens)

    def loss(x: np.ndarray) -> float:
        if (x < 0).any():
            return 1e9
        trial = replace(costs, prefill_step_ms=x[0], image_ms=x[1], waiting_ms=x[2] / 1e3)
        err = 0.0
        for p, m in zip(points, measured):
            s = Moments.simulated(simulate_point(p, trial, prompts, config, drain).replicas[0])
            err += np.log(s.steps_per_s / m.steps_per_s) ** 2 + np.log(s.mean_batch / m.mean_batch) ** 2
        return err

    x0 = np.array([image_request / 2, image_request / 2, 20.0])
    best = minimize(loss, x0, method="Nelder-Mead", options={"xatol": 0.5, "fatol": 1e-4, "maxfev": 120,
                                                             "initial_simplex": [x0, x0 + [20, 0, 0], x0 + [0, 20, 0],
                                                                                 x0 + [0, 0, 20]]})
    return float(best.x[0]), float(best.x[1]), float(best.x[2] / 1e3)


def calibrate(results: Path, sweep_dir: Path, fit_rates: tuple[float, ...] = (4.0, 8.0, 12.0, 16.0)
              ) -> tuple[StepCosts, PromptModel, Sweep]:
    sweep = Sweep.load(sweep_dir)
    costs, prompts = StepCosts.from_results(results), fit_prompt_model(sweep)
    step_ms, image_ms, waiting_ms = fit_step_costs(sweep, costs, prompts, fit_rates)
    return replace(costs, prefill_step_ms=step_ms, image_ms=image_ms, waiting_ms=waiting_ms), prompts, sweep


def replica_config(sweep: Sweep) -> ReplicaConfig:
    """The sweep server's flags that the replica model uses (its defaults where a flag was not given)."""
    args = list(sweep.config["server"]["args"])
    flags = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    defaults = ReplicaConfig()
    max_len = int(flags.get("--max-model-len", 0))
    return ReplicaConfig(
        max_num_seqs=int(flags.get("--max-num-seqs", defaults.max_num_seqs)),
        max_num_batched_tokens=int(flags.get("--max-num-batched-tokens", max(max_len, 2048) if max_len else
                                             defaults.max_num_batched_tokens)),
        max_loras=int(flags.get("--max-loras", defaults.max_loras)),
        max_cpu_loras=int(flags.get("--max-cpu-loras", flags.get("--max-loras", defaults.max_cpu_loras))),
    )


def check_one_gpu(costs: StepCosts, prompts: PromptModel, sweep: Sweep, shape: ModelShape = QWEN2_VL_7B
                  ) -> list[dict]:
    """The one-GPU simulation of every measured point, side by side with the measurement."""
    config, drain = replica_config(sweep), float(sweep.config.get("drain_timeout_s", 120.0))
    out = []
    for p in sorted(sweep.points, key=lambda p: p.key.rate):
        sim = simulate_point(p, costs, prompts, config, drain, shape)
        out.append({"rate": p.key.rate, "measured": {**_brief(summarize(p.records, sweep.slo)),
                                                     **asdict(Moments.measured(p))},
                    "simulated": {**_brief(summarize(sim.records(), sweep.slo)),
                                  **asdict(Moments.simulated(sim.replicas[0]))}})
    return out


def _brief(s: dict) -> dict:
    return {"throughput_rps": s["throughput_rps"], "goodput_rps": s["goodput_rps"],
            "slo_attainment": s["slo_attainment"], "latency_mean_s": s["latency_s"]["mean"],
            "ttft_p50_s": s["ttft_s"]["p50"], "tpot_mean_s": s["tpot_s"]["mean"]}


def costs_summary(costs: StepCosts, prompts: PromptModel) -> dict:
    return {"costs": costs.to_dict(), "prompts": asdict(prompts)}
