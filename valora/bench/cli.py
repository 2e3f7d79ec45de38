"""`valora bench run|sweep|report`: trace-driven load against OpenAI-compatible servers (docs/bench.md)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger("valora.bench")


def _size(text: str) -> list[int]:
    w, _, h = text.partition("x")
    return [int(w), int(h or w)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", required=True, metavar="SUBCOMMAND")

    p = sub.add_parser("sweep", help="start the server per scheduler and replay every point of a YAML config")
    p.add_argument("config", type=Path, help="sweep config (see benchmarks/e2e_sweep.yaml)")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory; points already there are kept, not rerun (default: bench-results/<config>)")
    p.add_argument("--policies", nargs="+", default=None, help="run only these schedulers (default: the config's)")
    p.add_argument("--workloads", nargs="+", default=None, help="run only these workloads (default: all)")
    p.add_argument("--skews", nargs="+", default=None, metavar="SKEW",
                   help="run only these skews, as written in the config, e.g. zipf:1.0 (default: all)")
    p.add_argument("--base-url", default=None,
                   help="drive this running OpenAI-compatible server instead of starting `valora serve`")
    p.add_argument("--name", default="external", help="policy name for --base-url results (default: external)")
    p.add_argument("--api-key", default=None, help="bearer key for --base-url")
    p.add_argument("--budget-s", type=float, default=None, metavar="S",
                   help="start no point that could end after S seconds of this call; exit status 75 means points "
                        "are left: run the same command again (finished points are skipped)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("run", help="replay one point against a running server (--base-url)")
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", type=Path, required=True, help="results directory (a point already there is kept)")
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-latency", type=float, default=None, metavar="S", help="end-to-end latency bound")
    p.add_argument("--slo-ttft", type=float, default=None, metavar="S", help="time-to-first-token bound")
    p.add_argument("--slo-tpot", type=float, default=None, metavar="S", help="time-per-output-token bound")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("report", help="recompute the summary, redraw the plots and write report.md")
    p.add_argument("results", type=Path, help="results directory of a sweep or run")


def run(args: argparse.Namespace) -> int:
    from valora.bench.report import write_report
    from valora.bench.sweep import SweepConfig, run_sweep

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request and per /metrics poll otherwise
    if args.bench_command == "report":
        print(write_report(args.results))
        return 0
    if args.bench_command == "sweep":
        config = SweepConfig.load(args.config)
        if args.base_url:
            config = SweepConfig.from_dict({**config.to_dict(), "model": None, "server": {
                **config.to_dict()["server"], "base_url": args.base_url, "name": args.name, "api_key": args.api_key}})
        out = args.out or Path("bench-results") / args.config.stem
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
        out, policies, workloads, skews, budget = args.out, None, None, None, None
    code = run_sweep(config, out, policies, workloads, progress=not args.no_progress, budget_s=budget, skews=skews)
    if (out / "points").is_dir():
        logger.info("report: %s", write_report(out))
    return code
