"""`valora tune-kernels`: grid-search the LoRA kernel tiles on this GPU and write its table (or check a table)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from valora.errors import UserError
from valora.lora.tuning import space


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, help="table to write (default: the package's table for this GPU)")
    parser.add_argument("--ops", default="shrink,expand", help="which kernels to tune (default: both)")
    parser.add_argument("--tokens", type=_ints, default=space.TOKENS, help="tokens carrying an adapter")
    parser.add_argument("--segments", type=_ints, default=space.SEGMENTS, help="distinct adapters in the batch")
    parser.add_argument("--hidden", type=_ints, default=space.HIDDEN, help="input sizes of the shrink")
    parser.add_argument("--widths", type=_ints, default=space.WIDTHS, help="output sizes of the expand")
    parser.add_argument("--ranks", type=_ints, default=space.RANKS, help="max ranks (rank rows) of the stacks")
    parser.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per config in the tile grid")
    parser.add_argument("--final-reps", type=int, default=20, help="repetitions for the finalists and the result")
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
    ops = args.ops.split(",")
    grid = space.shapes(args.tokens, args.segments, args.hidden, args.widths, args.ranks)
    grid = {op: grid[op] for op in ops}
    problems = Problems(getattr(torch, args.dtype), device)
    path = args.out or table_path(props.name)
    info = {"dtype": args.dtype, "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat(), "sms": props.multi_processor_count}

    def save(results: list[Result]) -> None:
        """Written after every shape, so an interrupted sweep still leaves a usable table."""
        entries = {op: [(r.shape, r.config) for r in results if r.op == op] for op in ops}
        timings = [{"op": r.op, "shape": vars(r.shape), "tuned": round(r.us, 2), "heuristic": round(r.heuristic_us, 2)}
                   for r in results]
        ConfigTable(props.name, entries, dict(info, timings_us=timings)).save(path)

    results = tune(grid, problems, props.multi_processor_count, reps=args.reps, final_reps=args.final_reps,
                   progress=lambda items: tqdm(items, desc=f"tuning on {props.name}", unit="shape"),
                   on_result=(lambda results: None) if args.check else save)
    gains = [r.heuristic_us / r.us for r in results]
    summary: dict = {
        "device": props.name,
        "shapes": len(results),
        "geomean_gain_over_heuristic": float(torch.tensor(gains).log().mean().exp()),
    }
    if args.check:
        old = ConfigTable.load(path)
        rows = []
        for r in results:
            before = dict(old.entries[r.op])[r.shape]
            same = before == r.config
            before_us = r.us if same else problems.measure(r.op, r.shape, before, args.final_reps)
            rows.append({"op": r.op, "shape": vars(r.shape), "same": same, "old_over_new": before_us / r.us})
        ratios = sorted(row["old_over_new"] for row in rows)
        summary.update(
            table=str(path), identical=sum(row["same"] for row in rows) / len(rows),
            median_old_over_new=ratios[len(ratios) // 2], max_old_over_new=ratios[-1], rows=rows,
        )
        print(f"{summary['identical']:.0%} of {len(rows)} choices identical; where they differ, the table's choice "
              f"re-timed is at most {summary['max_old_over_new']:.3f}x the new best (median "
              f"{summary['median_old_over_new']:.3f}x)")
    else:
        print(f"wrote {path}: {len(results)} shapes, geomean {summary['geomean_gain_over_heuristic']:.3f}x "
              f"faster than the heuristic tiles")
    if args.report:
        args.report.write_text(json.dumps(summary, indent=1) + "\n")
    return 0
