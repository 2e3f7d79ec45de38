"""`valora tune-kernels`: time the LoRA plans on this GPU and write its table (or check a table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from valora.errors import UserError
from valora.lora.tuning import space


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _layers(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in space.LAYERS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer {unknown[0]!r}; choose from {','.join(space.LAYERS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path,
                        help="table to write (default: the package's table for this GPU); the shapes tuned replace "
                             "theirs in it, its other entries stay")
    parser.add_argument("--layers", type=_layers, default=tuple(space.LAYERS),
                        help=f"LoRA calls to tune (default: {','.join(space.LAYERS)}, Qwen2-VL-7B's)")
    parser.add_argument("--tokens", type=_ints, default=space.TOKENS, help="tokens carrying an adapter")
    parser.add_argument("--segments", type=_ints, default=space.SEGMENTS, help="distinct adapters in the batch")
    parser.add_argument("--ranks", type=_ints, default=space.RANKS, help="max ranks of the stacks")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per candidate in the first rounds")
    parser.add_argument("--final-reps", type=int, default=20, help="repetitions for the finalists and the result")
    parser.add_argument("--previous", type=Path,
                        help="table whose choices the new one may not be slower than, shape by shape (default: the "
                             "table at --out, read before it is overwritten; none with --resume)")
    parser.add_argument("--resume", action="store_true",
                        help="tune only the shapes that --out has no plan for yet (a run cut short)")
    parser.add_argument("--time-limit", type=float, metavar="SECONDS",
                        help="start no shape after this many seconds (smallest token counts go first; the table is "
                             "written after every shape: --resume tunes the rest)")
    parser.add_argument("--check", action="store_true",
                        help="re-tune and compare with the existing table instead of writing one")
    parser.add_argument("--report", type=Path, help="write a JSON summary (with --check: the comparison) here")


def run(args: argparse.Namespace) -> int:
    import datetime

    import torch
    import triton
    from tqdm import tqdm

    from valora.lora.tuning.table import ConfigTable, table_path
    from valora.lora.tuning.tuner import Problems, Result, tune

    if not torch.cuda.is_available():
        raise UserError("tune-kernels needs a CUDA GPU (this torch sees none); run it on the GPU you serve on")
    device = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(device)
    path = args.out or table_path(props.name)
    grid = space.shapes(args.layers, args.tokens, args.segments, args.ranks)
    existing = ConfigTable.load(path) if path.exists() else None
    if existing is None or existing.device != props.name:
        existing = ConfigTable(props.name)
    if args.resume:
        done = {shape for shape, _ in existing.plans}
        grid = [shape for shape in grid if shape not in done]
    previous_path = args.previous or (None if args.resume else path)
    previous = ConfigTable.load(previous_path) if previous_path is not None and previous_path.exists() else None
    if args.check and previous is None:
        raise UserError(f"--check compares with a table, and there is none at {previous_path}")
    problems = Problems(getattr(torch, args.dtype), device)
    existing.info.update(dtype=args.dtype, torch=torch.__version__, triton=triton.__version__,
                         date=datetime.date.today().isoformat(), sms=props.multi_processor_count,
                         previous=str(previous_path) if previous is not None else None)
    print(f"{len(grid)} call shapes to tune on {props.name}; previous table: {existing.info['previous']}", flush=True)

    def timings(results: list[Result]) -> list[dict]:
        return [{"shape": r.shape.to_dict(), "tuned": round(r.us, 2), "heuristic": round(r.heuristic_us, 2),
                 "previous": round(r.previous_us, 2) if r.previous_us is not None else None} for r in results]

    def save(results: list[Result]) -> None:
        """Written after every shape, so an interrupted sweep still leaves a usable table (and --resume)."""
        existing.updated([(r.shape, r.plan) for r in results], timings(results)).save(path)

    results = tune(grid, problems, props.multi_processor_count, previous=previous, reps=args.reps,
                   final_reps=args.final_reps, time_limit_s=args.time_limit,
                   progress=lambda items: tqdm(items, desc=f"tuning on {props.name}", unit="shape"),
                   on_result=(lambda results: None) if args.check else save)
    if len(results) < len(grid):
        print(f"time limit reached: {len(grid) - len(results)} of {len(grid)} shapes left; the same command with "
              f"--resume{'' if args.previous else ' --previous OLD_TABLE'} tunes them", flush=True)
    gains = [r.heuristic_us / r.us for r in results]
    summary: dict = {"device": props.name, "shapes": len(results),
                     "geomean_gain_over_heuristic": float(torch.tensor(gains).log().mean().exp()) if gains else None,
                     "rows": timings(results)}
    compared = [r for r in results if r.previous_us is not None]
    if compared:
        ratios = sorted(r.previous_us / r.us for r in compared)
        summary.update(previous=existing.info["previous"],
                       identical=sum(r.plan == r.previous for r in compared) / len(compared),
                       median_previous_over_new=ratios[len(ratios) // 2], max_previous_over_new=ratios[-1])
        print(f"{summary['identical']:.0%} of {len(compared)} choices identical to the previous table's; where they "
              f"differ, the previous choice re-timed is at most {summary['max_previous_over_new']:.3f}x the new best "
              f"(median {summary['median_previous_over_new']:.3f}x)")
    if not args.check:
        print(f"wrote {path}: {len(results)} shapes tuned, geomean {summary['geomean_gain_over_heuristic'] or 1:.3f}x "
              f"faster than the heuristic plans")
    if args.report:
        args.report.write_text(json.dumps(summary, indent=1) + "\n")
    return 0
