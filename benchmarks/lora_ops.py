"""LoRA operator benchmark on Qwen2-VL-7B shapes: every backend, the base GEMM, and the roofline.

    python -m benchmarks.lora_ops --commit $(git rev-parse --short HEAD)      # on the GPU: writes the JSON
    python -m benchmarks.lora_ops --previous-table old_h100.json              # ... with the replaced table's plans
    python -m benchmarks.lora_ops --sections decode few                       # the decode and few-adapter parts only
    python -m benchmarks.lora_ops --report benchmarks/results/lora_ops_h100.json   # anywhere: plot + markdown
    python -m benchmarks.lora_ops --quick                                     # tiny shapes on the CPU (interpreter)

Three sections, in this order:
- decode: one decoder layer's four LoRA launches as the engine makes them (fused qkv, o, fused gate/up, down) at
  16/32/64 tokens with 32 adapters of rank 16, against the layer's base GEMMs, once with the exact metadata
  (`LoRAMeta.build`) and once with the metadata a CUDA-graph replay uses (`GraphLoRAMeta` sized for the engine's
  bucket: the batch size, and the number of distinct adapters rounded up to its bucket);
- few: one or few adapters of rank 64 on fused gate/up and down_proj, 1 to 2048 tokens, where atmm lost to its
  peers (issue 18), against the project's baseline backends and the previous table's plan;
- grid: every backend on every layer (unfused, as issue 6's grid) x tokens x adapters x ranks.

Times are device times with L2 flushed before every call (valora.lora.tuning.timing), as inside a CUDA graph.
Each case is one `lora_matmul(..., out=y)` call, accumulating into y. The floor of a case is the larger of its
fewest bytes (x read once, each active adapter's A and B rows up to its rank read once, y read and written once)
over the measured copy bandwidth, and its FLOPs over the measured bf16 matmul rate. `atmm_heuristic` is atmm with
the heuristic plans instead of the tuned table; `atmm_previous` is atmm with the plans of `--previous-table` (the
table the current one replaced: its choices must not be beaten by more than 5%).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

BACKENDS = ("atmm", "atmm_heuristic", "atmm_previous", "sgmv", "bgmv", "gather", "torch")
BASELINES = ("sgmv", "bgmv", "gather")
SECTIONS = ("decode", "few", "grid")
SLOWER = 1.05  # acceptance: atmm no more than 5% slower than the best baseline or the previous table's plan
MAX_NUM_SEQS, MAX_LORAS = 128, 32  # the engine's graph buckets in benchmarks/engine_speed.py


@dataclass(frozen=True)
class Sizes:
    layers: dict[str, tuple[int, tuple[int, ...]]]  # the grid's layers: (K, output slices)
    fused: dict[str, tuple[int, tuple[int, ...]]]  # one decoder layer's four launches as the engine makes them
    tokens: tuple[int, ...]
    adapters: tuple[int, ...]
    ranks: tuple[str, ...]
    mixed: tuple[int, ...]
    decode_tokens: tuple[int, ...]
    decode_adapters: int
    few_tokens: tuple[int, ...]
    few_adapters: tuple[int, ...]
    few_rank: int
    gather_limit: int  # bytes of per-token weight copies gather may make before it is not run


FULL = Sizes(
    layers={"q/o 3584>3584": (3584, (3584,)), "k/v 3584>512": (3584, (512,)),
            "gate/up 3584>18944": (3584, (18944,)), "down 18944>3584": (18944, (3584,))},
    fused={"qkv": (3584, (3584, 512, 512)), "o": (3584, (3584,)), "gate_up": (3584, (18944, 18944)),
           "down": (18944, (3584,))},
    tokens=(1, 8, 32, 128, 512, 2048, 8192), adapters=(1, 4, 16, 64), ranks=("8", "16", "32", "64", "128", "mixed"),
    mixed=(8, 16, 32, 64, 128), decode_tokens=(16, 32, 64), decode_adapters=32,
    few_tokens=(1, 8, 32, 128, 512, 2048), few_adapters=(1, 2, 4), few_rank=64, gather_limit=4 << 30,
)
QUICK = Sizes(  # the same sections on a model of hidden size 64, to check the script on the CPU
    layers={"q/o 64>64": (64, (64,)), "down 96>64": (96, (64,))},
    fused={"qkv": (64, (64, 16, 16)), "o": (64, (64,)), "gate_up": (64, (96, 96)), "down": (96, (64,))},
    tokens=(1, 8), adapters=(1, 4), ranks=("8", "mixed"), mixed=(8, 16),
    decode_tokens=(4, 8), decode_adapters=4, few_tokens=(1, 8), few_adapters=(1, 2), few_rank=16,
    gather_limit=4 << 30,
)


def rank_list(spec: str, adapters: int, sizes: Sizes) -> tuple[int, list[int]]:
    """(stack max rank, rank of each adapter)."""
    if spec == "mixed":
        return max(sizes.mixed), [sizes.mixed[i % len(sizes.mixed)] for i in range(adapters)]
    return int(spec), [int(spec)] * adapters


def make_problem(tokens, hidden, slices, ranks, max_rank, device, dtype, seed):
    """(x, stack_a, stack_b, ranks, scalings, ids, out): tokens spread evenly over the adapters, shuffled."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    n = len(ranks)
    opts = dict(device=device, dtype=dtype)
    x = torch.randn(tokens, hidden, generator=g, **opts)
    stack_a = torch.randn(n, len(slices) * max_rank, hidden, generator=g, **opts) * hidden**-0.5
    stack_b = torch.randn(n, sum(slices), max_rank, generator=g, **opts) * max_rank**-0.5
    rank_t = torch.tensor([ranks] * len(slices), dtype=torch.int32, device=device)
    scalings = torch.ones(n, dtype=torch.float32, device=device)
    ids = (torch.arange(tokens) % n)[torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))].tolist()
    out = torch.randn(tokens, sum(slices), generator=g, **opts)
    return x, stack_a, stack_b, rank_t, scalings, ids, out


def floor_us(tokens, hidden, slices, ranks, ceilings):
    """(floor in us, bound) of one case: see the module docstring."""
    n = len(ranks)
    width = sum(slices)
    per_adapter = [tokens // n + (i < tokens % n) for i in range(n)]
    active = [r for r, t in zip(ranks, per_adapter) if t]
    weight_bytes = 2 * sum(r * (hidden * len(slices) + width) for r in active)
    bytes_ = 2 * tokens * hidden + weight_bytes + 4 * tokens * width
    flops = 2 * sum(t * r * (hidden * len(slices) + width) for r, t in zip(ranks, per_adapter))
    mem, tc = bytes_ / ceilings["hbm_gbps"] / 1e3, flops / ceilings["bf16_tflops"] / 1e6
    return max(mem, tc), ("hbm" if mem >= tc else "tensor")


def measure_ceilings(device, quick: bool) -> dict[str, float]:
    from benchmarks.common import device_rates

    rates = device_rates(device, quick)
    return {"hbm_gbps": rates["copy_bytes_per_s"] / 1e9, "bf16_tflops": rates["matmul_flops_per_s"] / 1e12}


def time_backends(problem, slices, backends, device, gather_ok, previous, meta=None) -> dict[str, float | None]:
    """Each backend's time for one problem, with `meta` (default: the exact one of its ids)."""
    import contextlib

    from benchmarks.common import device_time_us
    from valora.lora.ops import LoRAMeta, lora_matmul
    from valora.lora.tuning.table import use_table

    x, stack_a, stack_b, ranks, scalings, ids, out = problem
    meta = meta if meta is not None else LoRAMeta.build(ids, device)
    tables = {"atmm_heuristic": None, "atmm_previous": previous}
    times: dict[str, float | None] = {}
    for name in backends:
        if (name == "gather" and not gather_ok) or (name == "atmm_previous" and previous is None) or (
                name == "torch" and meta.sizes is not None):  # the reference needs the host layout
            times[name] = None
            continue
        backend = name.split("_")[0]

        def call(backend=backend):
            lora_matmul(x, None, stack_a, stack_b, ranks, scalings, backend, slices=slices, out=out, meta=meta)

        with use_table(tables[name]) if name in tables else contextlib.nullcontext():
            times[name] = device_time_us(call, device, 5 if name == "torch" else 20)
    return times


def base_gemm_us(tokens, hidden, width, device, dtype, cache) -> float:
    import torch

    from benchmarks.common import device_time_us

    key = (tokens, hidden, width)
    if key not in cache:
        x = torch.randn(tokens, hidden, dtype=dtype, device=device)
        w = torch.randn(width, hidden, dtype=dtype, device=device)
        cache[key] = device_time_us(lambda: torch.nn.functional.linear(x, w), device)
    return cache[key]


def graph_meta(ids: list[int], device):
    """The metadata a CUDA-graph replay of this decode batch uses in the engine: sized for its batch bucket and
    its adapter bucket (max_num_seqs 128, max_loras 32, as benchmarks/engine_speed.py runs it)."""
    from valora.engine.cuda_graphs import batch_buckets
    from valora.engine.graph_lora import adapter_buckets
    from valora.lora.ops.meta import GraphLoRAMeta

    size = next(b for b in batch_buckets(MAX_NUM_SEQS) if b >= len(ids))
    distinct = len(set(ids))
    adapters = next(a for a in adapter_buckets(size, MAX_LORAS) if a >= distinct)
    graph = GraphLoRAMeta(size, adapters, device)
    graph.fill(ids)
    return graph.meta, (size, adapters)


def run_decode(args, sizes: Sizes, device, dtype) -> list[dict]:
    """One decoder layer's four fused LoRA launches vs its GEMMs, exact and graph metadata: atmm's plans only (the
    engine's backend; the baselines are held to it in the other sections)."""
    import torch

    cache: dict = {}
    rows = []
    backends = [b for b in args.backends if b.startswith("atmm")]
    for tokens, (name, (hidden, slices)) in itertools.product(sizes.decode_tokens, sizes.fused.items()):
        n = sizes.decode_adapters
        problem = make_problem(tokens, hidden, slices, [16] * n, 16, device, dtype, seed=tokens)
        ids = problem[5]
        exact = time_backends(problem, slices, backends, device, True, args.previous)
        # A graph batch is padded to its bucket: the padding rows carry no adapter.
        meta, bucket = graph_meta(ids, device)
        pad = bucket[0] - tokens
        x, a, b, ranks, scalings, _, out = problem
        padded = (torch.cat([x, x.new_zeros(pad, hidden)]), a, b, ranks, scalings, ids + [-1] * pad,
                  torch.cat([out, out.new_zeros(pad, out.shape[1])]))
        graph = time_backends(padded, slices, backends, device, True, args.previous, meta=meta)
        rows.append({"launch": name, "tokens": tokens, "active_adapters": min(n, tokens), "us": exact,
                     "graph_us": graph, "graph_bucket": list(bucket),
                     "base_gemm_us": base_gemm_us(tokens, hidden, sum(slices), device, dtype, cache)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_few(args, sizes: Sizes, device, dtype, ceilings) -> list[dict]:
    """One or few adapters of the stack's rank on fused gate/up and down_proj."""
    cache: dict = {}
    rows = []
    cases = [(layer, t, n) for layer, t, n in itertools.product(("gate_up", "down"), sizes.few_tokens,
                                                                 sizes.few_adapters) if n <= t]
    for i, (layer, tokens, adapters) in enumerate(cases):
        hidden, slices = sizes.fused[layer]
        ranks = [sizes.few_rank] * adapters
        problem = make_problem(tokens, hidden, slices, ranks, sizes.few_rank, device, dtype, seed=100 + i)
        gather_ok = tokens * sizes.few_rank * (hidden + sum(slices)) * 2 <= sizes.gather_limit
        rows.append({"launch": layer, "tokens": tokens, "adapters": adapters, "rank": sizes.few_rank,
                     "us": time_backends(problem, slices, args.backends, device, gather_ok, args.previous),
                     "base_gemm_us": base_gemm_us(tokens, hidden, sum(slices), device, dtype, cache),
                     "floor_us": floor_us(tokens, hidden, slices, ranks, ceilings)[0]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_grid(args, sizes: Sizes, device, dtype, ceilings, checkpoint) -> list[dict]:
    from tqdm import tqdm

    cases = [(layer, t, n, r) for layer, t, n, r in itertools.product(sizes.layers, sizes.tokens, sizes.adapters,
                                                                      sizes.ranks) if n <= t]
    gemm_cache: dict = {}
    rows = []
    for i, (layer, tokens, adapters, spec) in enumerate(tqdm(cases, desc="lora_ops", unit="case")):
        hidden, slices = sizes.layers[layer]
        max_rank, ranks = rank_list(spec, adapters, sizes)
        problem = make_problem(tokens, hidden, slices, ranks, max_rank, device, dtype, seed=i)
        gather_ok = tokens * max_rank * (hidden + sum(slices)) * 2 <= sizes.gather_limit
        floor, bound = floor_us(tokens, hidden, slices, ranks, ceilings)
        rows.append({
            "layer": layer, "tokens": tokens, "adapters": adapters, "ranks": spec,
            "us": time_backends(problem, slices, args.backends, device, gather_ok, args.previous),
            "base_gemm_us": base_gemm_us(tokens, hidden, sum(slices), device, dtype, gemm_cache),
            "floor_us": floor, "bound": bound,
        })
        del problem
        if i % 25 == 24:
            checkpoint(rows)
    return rows


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def _reference(us: dict) -> tuple[float | None, str | None]:
    """The time atmm is held to: the best of the baseline backends and the previous table's plan."""
    named = [(us[b], b) for b in (*BASELINES, "atmm_previous") if us.get(b) is not None]
    return min(named) if named else (None, None)


def _versus(rows: list[dict]) -> dict:
    """atmm against each row's reference (best baseline or previous plan): ratios > 1 are atmm faster."""
    ratios = [(ref / r["us"]["atmm"], r, name) for r in rows for ref, name in [_reference(r["us"])]
              if ref is not None and r["us"].get("atmm")]
    slow = [dict(row, reference=name, speedup=ratio) for ratio, row, name in ratios if ratio < 1 / SLOWER]
    return {"cases": len(ratios), "geomean": geomean(r for r, _, _ in ratios),
            "min": min((r for r, _, _ in ratios), default=float("nan")), "slower_by_5pct": slow}


def summarize(result: dict) -> dict:
    summary: dict = {}
    grid = result.get("grid", [])
    if grid:
        best = [(min(r["us"][b] for b in BASELINES if r["us"].get(b) is not None) / r["us"]["atmm"], r)
                for r in grid if any(r["us"].get(b) is not None for b in BASELINES)]
        large = sorted(r["floor_us"] / r["us"]["atmm"] for r in grid if r["floor_us"] >= 50)
        tuned = [r["us"]["atmm_heuristic"] / r["us"]["atmm"] for r in grid if r["us"].get("atmm_heuristic")]
        summary.update({
            "cases": len(grid),
            "atmm_vs_best_baseline_geomean": geomean(x for x, _ in best),
            "atmm_vs_best_baseline_min": min(x for x, _ in best),
            "atmm_vs_best_baseline_by_tokens": {
                str(t): geomean(x for x, r in best if r["tokens"] == t) for t in sorted({r["tokens"] for r in grid})},
            "cases_below_0.95": [dict(r, speedup=x) for x, r in best if x < 0.95],
            "grid_vs_reference": _versus(grid),
            "large_cases": len(large),
            "roofline_fraction_large_min": large[0] if large else float("nan"),
            "roofline_fraction_large_median": large[len(large) // 2] if large else float("nan"),
            "roofline_fraction_large_at_least_75": sum(f >= 0.75 for f in large) / max(len(large), 1),
            "tuned_vs_heuristic_geomean": geomean(tuned),
            "tuned_vs_heuristic_min": min(tuned, default=float("nan")),
            "tuned_slower_than_heuristic_by_5pct": sum(t < 1 / 1.05 for t in tuned),
        })
    decode = {}
    for tokens in sorted({r["tokens"] for r in result.get("decode", [])}):
        rows = [r for r in result["decode"] if r["tokens"] == tokens]
        base = sum(r["base_gemm_us"] for r in rows)
        entry = {"base_gemm_us": base}
        for key, meta in (("us", "exact"), ("graph_us", "graph")):
            if all(r.get(key, {}).get("atmm") for r in rows):
                lora = sum(r[key]["atmm"] for r in rows)
                entry[meta] = {
                    "lora_us": lora, "ratio": lora / base,
                    "per_launch": {r["launch"]: r[key]["atmm"] / r["base_gemm_us"] for r in rows}}
        decode[str(tokens)] = entry
    summary["decode_layer"] = decode
    if result.get("few"):
        summary["few_vs_reference"] = _versus(result["few"])
    return summary


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = result.get("grid", [])
    if not grid:
        return
    layers = list(dict.fromkeys(r["layer"] for r in grid))
    adapters_grid = sorted({r["adapters"] for r in grid})
    panels = [(spec, n) for spec, n in (("64", 4), ("mixed", 16)) if any(r["ranks"] == spec for r in grid)]
    if not panels:
        return
    fig, axes = plt.subplots(len(panels), len(layers), figsize=(4 * len(layers), 3.4 * len(panels)), squeeze=False)
    styles = {"atmm": "o-", "atmm_heuristic": "o:", "atmm_previous": "o--", "sgmv": "s-", "bgmv": "^-",
              "gather": "v-", "torch": "x-"}
    for (spec, adapters), row_axes in zip(panels, axes):
        for layer, ax in zip(layers, row_axes):
            rows = sorted((r for r in grid if r["layer"] == layer and r["ranks"] == spec and r["adapters"] == max(
                a for a in adapters_grid if a <= min(adapters, r["tokens"]))), key=lambda r: r["tokens"])
            tokens = [r["tokens"] for r in rows]
            for name, style in styles.items():
                pts = [(t, r["us"][name]) for t, r in zip(tokens, rows) if r["us"].get(name)]
                if pts:
                    ax.plot(*zip(*pts), style, label=name, markersize=4)
            ax.plot(tokens, [r["base_gemm_us"] for r in rows], "k--", label="base GEMM", linewidth=1)
            ax.plot(tokens, [r["floor_us"] for r in rows], color="grey", linestyle=":", label="LoRA floor")
            ax.set(xscale="log", yscale="log", xlabel="tokens", title=f"{layer}\nranks {spec}, {adapters} adapters")
            ax.grid(True, which="both", alpha=0.3)
        row_axes[0].set_ylabel("time (us)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"LoRA operator cost on {result['device']} ({result['date']}, commit {result['commit']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _cells(us: dict, names: list[str]) -> str:
    return " | ".join(f"{us[n]:.1f}" if us.get(n) else "-" for n in names)


def markdown(result: dict) -> str:
    s = result["summary"]
    n, few_rank = result.get("decode_adapters", 32), result.get("few_rank", 64)
    lines = [
        f"Device {result['device']}, {result['date']}, commit {result['commit']}, torch {result['torch']}, "
        f"triton {result['triton']}. Ceilings measured in the same run: copy {result['ceilings']['hbm_gbps']:.0f} "
        f"GB/s, matmul {result['ceilings']['bf16_tflops']:.0f} TFLOP/s.", "",
        "| target | measured |", "| --- | --- |",
    ]
    for tokens, d in s["decode_layer"].items():
        for key, label in (("exact", "exact metadata"), ("graph", "graph metadata")):
            if key in d:
                lines.append(f"| decode layer, {tokens} tokens, {n} adapters r16, {label}: LoRA / base GEMM "
                             f"(goal <= 25%) | {d[key]['ratio']:.0%} ({d[key]['lora_us']:.1f} / "
                             f"{d['base_gemm_us']:.1f} us) |")
    for key, label in (("few_vs_reference", f"one or few rank-{few_rank} adapters, gate/up and down"),
                       ("grid_vs_reference", "the whole grid")):
        if key in s:
            v = s[key]
            lines.append(f"| {label}: atmm vs the best baseline or the previous table's plan, {v['cases']} cases "
                         f"(goal: none more than 5% slower) | geomean {v['geomean']:.2f}x, worst {v['min']:.2f}x, "
                         f"{len(v['slower_by_5pct'])} cases more than 5% slower |")
    if "cases" in s:
        lines += [
            f"| atmm vs best of sgmv/bgmv/gather, geomean over {s['cases']} cases | "
            f"{s['atmm_vs_best_baseline_geomean']:.2f}x (worst {s['atmm_vs_best_baseline_min']:.2f}x) |",
            f"| fraction of the roofline floor, {s['large_cases']} large cases (floor >= 50 us) | "
            f"median {s['roofline_fraction_large_median']:.0%}, min {s['roofline_fraction_large_min']:.0%}, "
            f"{s['roofline_fraction_large_at_least_75']:.0%} of cases >= 75% |",
            f"| tuned vs heuristic plans, geomean over the grid | {s['tuned_vs_heuristic_geomean']:.2f}x "
            f"(worst {s['tuned_vs_heuristic_min']:.2f}x; tuned >5% slower in "
            f"{s['tuned_slower_than_heuristic_by_5pct']} cases) |",
            "", "atmm vs best baseline, geomean by tokens: " + ", ".join(
                f"{t}: {v:.2f}x" for t, v in s["atmm_vs_best_baseline_by_tokens"].items())]
    if result.get("decode"):
        lines += ["", f"One decoder layer's launches, {n} adapters of rank 16 (atmm us, exact / graph metadata, "
                  "and the base GEMM):", "", "| tokens | graph bucket | " + " | ".join(
                      dict.fromkeys(r["launch"] for r in result["decode"])) + " |", "| ---: | --- |" + " --- |" * 4]
        for tokens in s["decode_layer"]:
            rows = [r for r in result["decode"] if str(r["tokens"]) == tokens]
            graph = lambda r: f"{r['graph_us']['atmm']:.1f}" if r.get("graph_us") else "-"  # noqa: E731
            lines.append(f"| {tokens} | {tuple(rows[0].get('graph_bucket', ()))} | " + " | ".join(
                f"{r['us']['atmm']:.1f} / {graph(r)} / {r['base_gemm_us']:.1f}" for r in rows) + " |")
    if result.get("few"):
        names = [b for b in BACKENDS if any(r["us"].get(b) for r in result["few"])]
        lines += ["", f"One or few adapters of rank {few_rank} (us):", "",
                  "| launch | tokens | adapters | " + " | ".join(names) + " | base GEMM |",
                  "| --- | ---: | ---: | " + " | ".join("---:" for _ in names) + " | ---: |"]
        lines += [f"| {r['launch']} | {r['tokens']} | {r['adapters']} | {_cells(r['us'], names)} | "
                  f"{r['base_gemm_us']:.1f} |" for r in result["few"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/lora_ops_<gpu>.json)")
    p.add_argument("--commit", default=None, help="commit measured (default: git's HEAD or $VALORA_COMMIT)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--layers", nargs="+", help="grid layers (default: all)")
    p.add_argument("--tokens", nargs="+", type=int, help="grid token counts")
    p.add_argument("--adapters", nargs="+", type=int, help="grid adapter counts")
    p.add_argument("--ranks", nargs="+", help="grid ranks (8, 16, ..., mixed)")
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                   help="default: all (--quick: all but bgmv, whose per-token programs crawl in the interpreter)")
    p.add_argument("--previous-table", type=Path,
                   help="the tuned table the current one replaced (e.g. `git show OLD:valora/lora/tuning/X.json`): "
                        "its plans are timed as atmm_previous")
    p.add_argument("--quick", action="store_true", help="tiny shapes, float32, on the CPU (Triton interpreter)")
    p.add_argument("--report", type=Path, help="only re-plot and print the markdown of an existing JSON")
    args = p.parse_args()
    if args.report:
        result = json.loads(args.report.read_text())
        result["summary"] = summarize(result)
        plot(result, args.report.with_suffix(".png"))
        print(markdown(result))
        return
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
    args.backends = args.backends or [b for b in BACKENDS if not (args.quick and b == "bgmv")]

    import torch
    import triton

    from benchmarks.common import git_commit
    from valora.lora.tuning.table import ConfigTable

    sizes = QUICK if args.quick else FULL
    sizes = Sizes(**{**vars(sizes), **{k: tuple(v) for k, v in (("tokens", args.tokens), ("adapters", args.adapters),
                                                                   ("ranks", args.ranks)) if v}})
    if args.layers:
        sizes = Sizes(**{**vars(sizes), "layers": {k: sizes.layers[k] for k in args.layers}})
    device = torch.device("cpu") if args.quick else torch.device("cuda", torch.cuda.current_device())
    dtype = torch.float32 if args.quick else torch.bfloat16
    name = "cpu" if args.quick else torch.cuda.get_device_name(device)
    args.previous = ConfigTable.load(args.previous_table) if args.previous_table else None
    ceilings = measure_ceilings(device, args.quick)
    slug = "cpu_quick" if args.quick else "h100" if "H100" in name else "h200" if "H200" in name else \
        name.replace(" ", "_").lower()
    out = args.out or Path(__file__).parent / "results" / f"lora_ops_{slug}.json"
    result: dict = {
        "device": name, "date": datetime.date.today().isoformat(), "commit": args.commit or git_commit(),
        "torch": torch.__version__, "triton": triton.__version__, "ceilings": ceilings, "dtype": str(dtype),
        "previous_table": str(args.previous_table) if args.previous_table else None,
        "decode_adapters": sizes.decode_adapters, "few_rank": sizes.few_rank,
    }

    def checkpoint(grid: list[dict] | None = None) -> None:
        """Partial results survive an interrupted run."""
        if grid is not None:
            result["grid"] = grid
        out.write_text(json.dumps(result, indent=1) + "\n")

    if "decode" in args.sections:
        result["decode"] = run_decode(args, sizes, device, dtype)
        checkpoint()
    if "few" in args.sections:
        result["few"] = run_few(args, sizes, device, dtype, ceilings)
        checkpoint()
    if "grid" in args.sections:
        result["grid"] = run_grid(args, sizes, device, dtype, ceilings, checkpoint)
    result["summary"] = summarize(result)
    checkpoint()
    print(markdown(result))
    print(f"written {out}")


if __name__ == "__main__":
    main()
