"""`valora bench run|sweep|report|costs|simulate`: trace-driven load against OpenAI-compatible servers, the
step costs the servers logged, and the scaling simulator fed by their measurements (docs/bench.md).

`run` and `sweep` end with a summary table on screen (`valora.bench.console`) and exit 1 when more than
`--max-failure-ratio` of the measured requests failed. Results go under the current directory by default
(`bench-results/`), never into the package or the repository's tracked files unless asked to.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from valora.errors import UserError

logger = logging.getLogger("valora.bench")
DEFAULT_ROOT = Path("bench-results")


def _size(text: str) -> list[int]:
    w, _, h = text.partition("x")
    try:
        return [int(w), int(h or w)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use WxH, e.g. 448x448") from None


def _ratio(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid ratio {text!r}: use a number from 0 to 1")
    return v


def _add_outcome(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-failure-ratio", type=_ratio, default=0.0, metavar="F",
                   help="exit 1 when more than this share of the measured requests failed or timed out (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")

    text = ("start `valora serve` once per scheduler and replay every workload x skew x rate point of a YAML "
            "config; points already in --out are kept, so a stopped sweep resumes")
    p = sub.add_parser("sweep", help=text, description=text + ". See docs/bench.md.")
    p.add_argument("config", type=Path,
                   help="sweep config: benchmarks/cpu_sweep.yaml (CPU, minutes) or benchmarks/e2e_sweep.yaml (GPU)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results directory; points already there are kept, not rerun (default: "
                        f"{DEFAULT_ROOT}/<config name> under the current directory)")
    p.add_argument("--policies", nargs="+", default=None, help="run only these schedulers (default: the config's)")
    p.add_argument("--workloads", nargs="+", default=None, help="run only these workloads (default: all)")
    p.add_argument("--skews", nargs="+", default=None, metavar="SKEW",
                   help="run only these skews, as written in the config, e.g. zipf:1.0 (default: all)")
    p.add_argument("--base-url", default=None,
                   help="drive this running OpenAI-compatible server instead of starting `valora serve`")
    p.add_argument("--name", default="external", help="policy name for --base-url results (default: external)")
    p.add_argument("--api-key", default=None, help="bearer key for --base-url")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="start no point, nor a server, that could end after S seconds of this call; exit status 75 "
                        "means points are left: run the same command again (finished points are skipped)")
    p.add_argument("--all-rates", action="store_true",
                   help="also run the rates above one where a policy already missed the SLO (skipped by default: "
                        "saturated points are the slowest, and cannot raise its highest rate within the SLO)")
    _add_outcome(p)

    text = "replay one workload point against a server that is already running (--base-url)"
    p = sub.add_parser("run", help=text, description=text + ", e.g. one started with `valora serve`. See "
                                                            "docs/bench.md.")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results directory; a point already there is kept (default: {DEFAULT_ROOT}/run-<mix>-r<rate> "
                        "under the current directory)")
    p.add_argument("--name", default="external", help="policy name in the results (default: external)")
    p.add_argument("--api-key", default=None, help="bearer key for the server")
    p.add_argument("--mix", default="vqa", help="vqa, video, grounding or retrieval (default: vqa)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (default: 2)")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds (default: 60)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of unmeasured arrivals first (default: 10)")
    p.add_argument("--skew", default="zipf:1.0", help="zipf:ALPHA, hot:FRACTION or uniform (default: zipf:1.0)")
    p.add_argument("--arrivals", default="trace", choices=["trace", "poisson", "gamma"], help="(default: trace)")
    p.add_argument("--trace", default="conv", help="conv, code or a CSV path (default: conv)")
    p.add_argument("--cv", type=float, default=1.0, help="gamma arrivals: inter-arrival CV (default: 1)")
    p.add_argument("--image-size", type=_size, default=None, metavar="WxH", help="override the tasks' image size")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    p.add_argument("--slo-latency", type=float, default=None, metavar="S", help="end-to-end latency bound")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S", help="time-to-first-token bound")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S", help="time-per-output-token bound")
    _add_outcome(p)

    text = "recompute the summary from the raw records, redraw the plots and write report.md"
    p = sub.add_parser("report", help=text, description=text + " of a results directory of `run` or `sweep`.")
    p.add_argument("results", type=Path, help="results directory of a sweep or run")

    text = "predicted against measured step time of recorded runs (`valora serve --step-log`)"
    p = sub.add_parser("costs", help=text, description=text + "; with --fit, the device's step-cost table.")
    p.add_argument("logs", type=Path, nargs="+",
                   help="step logs, or results directories (their logs/*.steps*.jsonl.gz)")
    p.add_argument("--skip", type=int, default=200, metavar="N", help="leave out each log's first N steps "
                   "(default: 200)")
    p.add_argument("--table", type=Path, default=None, help="seed the replayed model with this recorded table")
    p.add_argument("--fit", type=Path, default=None, metavar="JSON",
                   help="write the table fitted from every step given, e.g. "
                        "valora/orchestrator/step_costs/NVIDIA_H100_80GB_HBM3.json")
    p.add_argument("--device", default=None, help="device name for --fit (default: the results' run.json)")
    p.add_argument("--out", type=Path, default=None, help="write the report here (markdown; with a .json twin)")

    p = sub.add_parser("simulate", help="model 1 to 64 GPUs behind adapter-affinity, least-loaded and round-robin "
                                        "routing from one GPU's measured costs")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"),
                   help="measured one-GPU results: engine_speed, engine_smoke, lora_ops JSON (default: %(default)s)")
    p.add_argument("--sweep", type=Path, default=None,
                   help="the measured one-GPU sweep to calibrate on and check against (default: RESULTS/e2e_slice1, "
                        "the slice the committed study used)")
    p.add_argument("--out", type=Path, default=Path("bench-results/simulate"),
                   help="where the JSON and the plot go (default: %(default)s; docs/benchmarks.md's run used "
                        "benchmarks/results)")
    p.add_argument("--name", default="simulate_h100", help="file name stem of the outputs (default: %(default)s)")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--routers", nargs="+", default=["affinity", "least_loaded", "round_robin"])
    p.add_argument("--adapters-per-gpu", type=int, default=16, help="adapters in the cluster per GPU (default: 16)")
    p.add_argument("--mix", default="vqa", help="task mix (default: vqa)")
    p.add_argument("--skew", default="zipf:1.0", help="adapter popularity (default: zipf:1.0)")
    p.add_argument("--duration", type=float, default=45.0, help="measured seconds per point (default: 45)")
    p.add_argument("--warmup", type=float, default=10.0, help="warm-up seconds per point (default: 10)")
    p.add_argument("--load-rate", type=float, default=8.0,
                   help="req/s per GPU at which adapter loads are compared (default: 8)")
    p.add_argument("--fit-rates", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0],
                   help="sweep rates whose server counters calibrate the prefill step (default: the points that "
                        "ran unmerged throughout: 4 8 12 16)")
    p.add_argument("--seed", type=int, default=0)


def simulate(args: argparse.Namespace) -> int:
    import json

    from valora.bench.sim.cluster import ClusterWorkload
    from valora.bench.sim.report import markdown, plot
    from valora.bench.sim.study import StudyConfig, run_study

    config = StudyConfig(
        gpus=tuple(args.gpus), routers=tuple(args.routers), load_rate=args.load_rate,
        workload=ClusterWorkload(mix=args.mix, skew=args.skew, adapters_per_gpu=args.adapters_per_gpu,
                                 duration_s=args.duration, warmup_s=args.warmup, seed=args.seed))
    sweep = args.sweep or args.results / "e2e_slice1"
    needed = [args.results / f"{name}_h100.json" for name in ("engine_speed", "engine_smoke", "lora_ops")]
    missing = [p for p in [*needed, sweep / "run.json"] if not p.is_file()]
    if missing:
        raise UserError(f"{missing[0]} not found: run from the repository root or pass --results (and --sweep)")
    result = run_study(args.results, sweep, config, tuple(args.fit_rates), log=logger.info)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    plot(result, out, args.name)
    print(markdown(result))
    return 0


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "simulate":
        return simulate(args)
    from valora.bench.console import failures, render
    from valora.bench.costs import write_costs
    from valora.bench.report import write_report
    from valora.bench.results import load_points
    from valora.bench.server import served_adapters
    from valora.bench.sweep import SweepConfig, plan, run_sweep

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request and per /metrics poll otherwise
    if args.bench_command == "costs":
        return _costs(args)
    if args.bench_command == "report":
        if not (args.results / "run.json").is_file():
            raise UserError(f"{args.results} is not a results directory of `valora bench run` or `sweep` "
                            "(no run.json)")
        print(write_report(args.results))
        return 0
    if args.base_url:
        served_adapters(args.base_url, args.api_key)  # a server that is down or refuses the key: say so now
    if args.bench_command == "sweep":
        config = SweepConfig.load(args.config)
        if args.base_url:
            config = SweepConfig.from_dict({**config.to_dict(), "model": None, "server": {
                **config.to_dict()["server"], "base_url": args.base_url, "name": args.name, "api_key": args.api_key}})
        out = args.out or DEFAULT_ROOT / args.config.stem
        policies = tuple(args.policies) if args.policies else None
        workloads = tuple(args.workloads) if args.workloads else None
        skews = tuple(args.skews) if args.skews else None
        budget = args.budget_s
    else:
        config = SweepConfig.from_dict({
            "workloads": [{"name": args.mix, "rates": [args.rate], "skews": [args.skew], "duration_s": args.duration,
                           "warmup_s": args.warmup, "image_size": args.image_size,
                           "arrivals": {"kind": args.arrivals, "trace": args.trace, "cv": args.cv}}],
            "server": {"base_url": args.base_url, "name": args.name, "api_key": args.api_key, "warmup_s": 0.0},
            "slo": {"latency_s": args.slo_latency, "ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
            "seed": args.seed,
        })
        out = args.out or DEFAULT_ROOT / f"run-{args.mix}-r{args.rate:g}"
        policies, workloads, skews, budget = None, None, None, None
    keys = {key for key, _, _ in plan(config, policies, workloads, skews)}
    code = run_sweep(config, out, policies, workloads, progress=not args.no_progress, budget_s=budget, skews=skews,
                     all_rates=getattr(args, "all_rates", False))
    points = [p for p in load_points(out) if p.key in keys] if (out / "points").is_dir() else []
    if not points:
        return code
    logger.info("report: %s", write_report(out))
    costs = write_costs(out)
    if costs is not None:  # where the steps' time went, stalls included (`valora bench costs`)
        logger.info("step costs: %s", costs)
    print(render(points, config.slo))
    failed, measured, _ = failures(points)
    if code == 0 and measured and failed / measured > args.max_failure_ratio:
        print(f"more than --max-failure-ratio {args.max_failure_ratio:g} of the requests failed")
        return 1
    return code


def _costs(args: argparse.Namespace) -> int:
    import json

    from valora.bench.costs import analyse, find_logs, run_info
    from valora.orchestrator.cost_model import CostTable

    recorded, info = run_info(args.logs)
    device = args.device or recorded
    text, summary = analyse(find_logs(args.logs), args.skip, CostTable.load(args.table) if args.table else None,
                            args.fit, device or "unknown", info)
    if args.out is not None:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    print(text)
    return 0
