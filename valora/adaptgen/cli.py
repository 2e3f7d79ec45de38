"""`valora adapters build TASKS.yaml --base MODEL --out DIR`: accuracy-aware adapter generation."""

from __future__ import annotations

import argparse
from pathlib import Path

from valora.errors import UserError

SUITES = Path(__file__).parent / "suites"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    b = sub.add_parser("build", help="pack tasks into as few LoRA adapters as their accuracy floors allow",
                       description="Fuse the tasks of TASKS greedily into LoRA adapters (and task heads), keeping "
                                   "every task at or above its accuracy floor on the validation split; write PEFT "
                                   "adapter directories, report.json and report.md to --out. Run the same command "
                                   "again to resume an interrupted build. See docs/adaptgen.md.")
    b.add_argument("tasks", help="task file (YAML), or 'embedded' for the packaged suite of seven tasks on real "
                                 "images from pip packages")
    b.add_argument("--base", required=True, metavar="MODEL",
                   help="Qwen2-VL model directory, or 'demo': the demo's small model recipe trained on the training "
                        "split of scikit-learn's digits only, so the validation split stays unseen (trained once "
                        "and kept in --cache-dir, else $VALORA_CACHE_DIR or ~/.cache/valora, for every build)")
    b.add_argument("--out", required=True, type=Path, metavar="DIR", help="where adapters and reports go")
    b.add_argument("--strategy", default="greedy", choices=["greedy", "per-task", "single"],
                   help="greedy: accuracy-aware fusion (default); per-task: one adapter per task; single: one adapter "
                        "for all tasks")
    b.add_argument("--only", default=None, metavar="A,B", help="build only these tasks of the file (in its order)")
    b.add_argument("--steps", type=int, default=None, metavar="N", help="training steps per run (default: the file's)")
    b.add_argument("--rank", type=int, default=None, metavar="R", help="LoRA rank (default: the file's)")
    b.add_argument("--floor", type=float, default=None, metavar="F",
                   help="one accuracy floor for every task (default: each task's own)")
    b.add_argument("--seed", type=int, default=None, metavar="S", help="training seed (default: the file's)")
    b.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="trained adapters, scores and the demo base model; share it between builds to reuse "
                        "trainings (default: OUT/.work)")


def run(args: argparse.Namespace) -> int:
    from valora.adaptgen.base import demo_base
    from valora.adaptgen.builder import BuildConfig, build
    from valora.adaptgen.spec import load_suite
    from valora.demo.artifacts import cache_dir

    path = SUITES / f"{args.tasks}.yaml" if (SUITES / f"{args.tasks}.yaml").is_file() else Path(args.tasks)
    suite = load_suite(path).with_overrides(tasks=args.only.split(",") if args.only else None, steps=args.steps,
                                            rank=args.rank, floor=args.floor, seed=args.seed)
    if args.base != "demo" and not (Path(args.base) / "config.json").is_file():
        raise UserError(f"--base {args.base} is not a model directory (no config.json); pass one, or 'demo'")
    cache = args.cache_dir or args.out / ".work"
    # the demo base is trained once per machine (per --cache-dir), not once per --out
    base = demo_base(args.cache_dir or cache_dir()) if args.base == "demo" else Path(args.base)
    report = build(BuildConfig(suite, base, args.out, cache, args.strategy))
    print((args.out / "report.md").read_text())
    if report["below_floor"]:
        print(f"shipped under their floor (validation): {', '.join(report['below_floor'])}")
        return 1
    return 0
