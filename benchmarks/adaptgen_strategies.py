"""One adapter per task, one adapter for all tasks, and the accuracy-aware packing, side by side (issue 8,
acceptance 3): adapter count, held-out accuracy per task, and the throughput of a mixed workload over them.

    python -m benchmarks.adaptgen_strategies [--workdir DIR]

Builds the embedded suite three times (`valora adapters build embedded --base demo --strategy ...`, one shared
cache), then serves each result with one engine (scheduler valora, every adapter in a slot) and sends it every
held-out image of every task (a seeded sample of up to --limit per task), shuffled, all at once: each request goes
to the adapter holding its task, head tasks are answered by their head. Throughput is requests per second of wall
time (the median of --repeats runs); the engine's own counters say how much of that time ran in each mode (merged,
unmerged, mixture). Accuracy is scored on these replies.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from benchmarks.common import write_result

STRATEGIES = ("per-task", "single", "greedy")


def mixed_workload(base: Path, report: dict, workspace, limit: int, seed: int, repeats: int) -> dict:
    from valora.adaptgen.evaluate import Evaluator
    from valora.heads.params import HeadParams
    from valora.lora.request import LoRARequest

    adapters = report["adapters"]
    evaluator = Evaluator(base, max_loras=len(adapters))  # the engine (scheduler valora) and its prompt rules
    engine = evaluator.llm.engine
    requests = []
    for i, a in enumerate(adapters, start=1):
        lora = LoRARequest(a["name"], i, a["path"])
        engine.core.add_lora(lora)
        for name in a["tasks"]:
            task = workspace.tasks[name]
            params = HeadParams(name) if task.by_head else evaluator.text_params(task)
            examples = task.data.splits["test"]
            picked = sorted(random.Random(seed).sample(range(len(examples)), min(limit, len(examples))))
            requests += [(task, examples.targets[k], evaluator.prompt(task, examples.images[k]), params, lora)
                         for k in picked]  # a sample: held-out splits are sorted by class
    random.Random(seed).shuffle(requests)
    runs = [_run(engine, requests) for _ in range(repeats)]
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    marks: dict[str, list[bool]] = {}
    for (task, target, *_), c in zip(requests, median.pop("outputs")):
        marks.setdefault(task.name, []).append(task.score(c.head if c.head is not None else c.text, target)[0])
    return {**median, "requests": len(requests), "repeats": repeats, "requests_per_s": len(requests) / median["wall_s"],
            "accuracy": {t: sum(m) / len(m) for t, m in marks.items()}}


def _run(engine, requests: list) -> dict:
    """All requests at once, stepped to the end; the engine's mode counters over exactly this run."""
    before = engine.core.stats()
    t0 = time.perf_counter()
    for k, (_, _, prompt, params, lora) in enumerate(requests):
        engine.add_request(f"r{k}", prompt, params, lora)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    wall = time.perf_counter() - t0
    stats = engine.core.stats()
    return {
        "wall_s": wall, "outputs": [done[f"r{k}"].outputs[0] for k in range(len(requests))],
        "mode_seconds": {m: stats.mode_seconds[m] - before.mode_seconds.get(m, 0.0) for m in stats.mode_seconds},
        "mode_steps": {m: stats.mode_steps[m] - before.mode_steps.get(m, 0) for m in stats.mode_steps},
        "switches": stats.num_switches - before.num_switches,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-adaptgen"))
    ap.add_argument("--limit", type=int, default=400, help="held-out images per task in the workload (default: 400)")
    ap.add_argument("--repeats", type=int, default=3, help="workload runs per strategy; the median is kept")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from valora.adaptgen.base import demo_base
    from valora.adaptgen.builder import BuildConfig, build
    from valora.adaptgen.cli import SUITES
    from valora.adaptgen.spec import load_suite
    from valora.adaptgen.workspace import Workspace

    suite = load_suite(SUITES / "embedded.yaml")
    cache = args.workdir / "cache"
    base = demo_base(cache)
    rows = {}
    for strategy in STRATEGIES:
        report = build(BuildConfig(suite, base, args.workdir / strategy, cache, strategy))
        workload = mixed_workload(base, report, Workspace(suite, base, cache), args.limit, args.seed, args.repeats)
        rows[strategy] = {
            "adapters": [a["tasks"] for a in report["adapters"]],
            "validation": {t: a["validation"][t] for a in report["adapters"] for t in a["tasks"]},
            "held_out": {t: a["held_out"][t] for a in report["adapters"] for t in a["tasks"]},
            "training_seconds": sum(a["training_seconds"] for a in report["adapters"]),
            "below_floor": report["below_floor"], "workload": workload,
        }
        print(strategy, rows[strategy], flush=True)
    floors = {t.name: t.floor for t in suite.tasks}
    base_held_out = report["base_held_out"]
    path = write_result("adaptgen_strategies_cpu", {"floors": floors, "base_held_out": base_held_out,
                                                    "limit": args.limit, "strategies": rows})
    print(f"written {path}")


if __name__ == "__main__":
    main()
