"""LoRA operator benchmark on Qwen2-VL-7B shapes: every backend, the base GEMM, and the roofline.

    python -m benchmarks.lora_ops --commit $(git rev-parse --short HEAD)      # on the GPU: writes the JSON
    python -m benchmarks.lora_ops --report benchmarks/results/lora_ops_h100.json   # anywhere: plot + markdown

Times are device times with L2 flushed before every call (valora.lora.tuning.timing), as inside a CUDA graph.
Each case is one `lora_matmul(..., out=y)` call (shrink + expand, accumulating into y). The floor of a case is
the larger of its fewest bytes (x read once, each active adapter's A and B rows up to its rank read once, y read
and written once) over the measured copy bandwidth, and its FLOPs over the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
from pathlib import Path

LAYERS = {  # name: (K, output slices) of Qwen2-VL-7B's language model
    "q/o 3584>3584": (3584, (3584,)),
    "k/v 3584>512": (3584, (512,)),
    "gate/up 3584>18944": (3584, (18944,)),
    "down 18944>3584": (18944, (3584,)),
}
FUSED = {  # the four LoRA launches of one decoder layer as the engine makes them (fused slices)
    "qkv": (3584, (3584, 512, 512)),
    "o": (3584, (3584,)),
    "gate_up": (3584, (18944, 18944)),
    "down": (18944, (3584,)),
}
TOKENS = (1, 8, 32, 128, 512, 2048, 8192)
ADAPTERS = (1, 4, 16, 64)
RANKS = ("8", "16", "32", "64", "128", "mixed")
MIXED = (8, 16, 32, 64, 128)
BACKENDS = ("atmm", "atmm_heuristic", "sgmv", "bgmv", "gather", "torch")
BASELINES = ("sgmv", "bgmv", "gather")
GATHER_LIMIT = 4 << 30  # bytes of per-token weight copies gather may make before it is not run
DECODE_TOKENS = (16, 32, 64)


def rank_list(spec: str, adapters: int) -> tuple[int, list[int]]:
    """(stack max rank, rank of each adapter)."""
    if spec == "mixed":
        return max(MIXED), [MIXED[i % len(MIXED)] for i in range(adapters)]
    return int(spec), [int(spec)] * adapters


def make_problem(tokens, hidden, slices, ranks, max_rank, device, seed):
    import torch

    from valora.lora.ops import LoRAMeta

    g = torch.Generator(device=device).manual_seed(seed)
    n = len(ranks)
    opts = dict(device=device, dtype=torch.bfloat16)
    x = torch.randn(tokens, hidden, generator=g, **opts)
    stack_a = torch.randn(n, len(slices) * max_rank, hidden, generator=g, **opts) * hidden**-0.5
    stack_b = torch.randn(n, sum(slices), max_rank, generator=g, **opts) * max_rank**-0.5
    rank_t = torch.tensor([ranks] * len(slices), dtype=torch.int32, device=device)
    scalings = torch.ones(n, dtype=torch.float32, device=device)
    ids = (torch.arange(tokens) % n)[torch.randperm(tokens)]
    meta = LoRAMeta.build(ids.tolist(), device)
    out = torch.randn(tokens, sum(slices), generator=g, **opts)
    return x, stack_a, stack_b, rank_t, scalings, meta, out


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


def measure_ceilings(device) -> dict[str, float]:
    import torch

    from valora.lora.tuning.timing import gpu_time_us

    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=device).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    copy_us = gpu_time_us(lambda: dst.copy_(src), reps=10, device=device)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    mm_us = gpu_time_us(lambda: a @ b, reps=10, device=device)
    return {"hbm_gbps": 2 * src.numel() * 2 / copy_us / 1e3, "bf16_tflops": 2 * 8192**3 / mm_us / 1e6}


def time_backends(problem, slices, backends, device, gather_ok) -> dict[str, float | None]:
    from valora.lora.ops import lora_matmul
    from valora.lora.tuning.table import use_table
    from valora.lora.tuning.timing import gpu_time_us

    x, stack_a, stack_b, ranks, scalings, meta, out = problem
    times: dict[str, float | None] = {}
    for name in backends:
        backend = "atmm" if name == "atmm_heuristic" else name
        if name == "gather" and not gather_ok:
            times[name] = None
            continue

        def call(backend=backend):
            lora_matmul(x, None, stack_a, stack_b, ranks, scalings, backend, slices=slices, out=out, meta=meta)

        reps = 5 if name == "torch" else 20
        if name == "atmm_heuristic":
            with use_table(None):
                times[name] = gpu_time_us(call, reps=reps, device=device)
        else:
            times[name] = gpu_time_us(call, reps=reps, device=device)
    return times


def base_gemm_us(tokens, hidden, width, device, cache) -> float:
    import torch

    from valora.lora.tuning.timing import gpu_time_us

    key = (tokens, hidden, width)
    if key not in cache:
        x = torch.randn(tokens, hidden, dtype=torch.bfloat16, device=device)
        w = torch.randn(width, hidden, dtype=torch.bfloat16, device=device)
        cache[key] = gpu_time_us(lambda: torch.nn.functional.linear(x, w), reps=20, device=device)
    return cache[key]


def run_grid(args, device, ceilings, checkpoint) -> list[dict]:
    from tqdm import tqdm

    cases = [(layer, t, n, r) for layer, t, n, r in itertools.product(args.layers, args.tokens, args.adapters, RANKS)
             if n <= t and r in args.ranks]
    gemm_cache: dict = {}
    rows = []
    for i, (layer, tokens, adapters, spec) in enumerate(tqdm(cases, desc="lora_ops", unit="case")):
        hidden, slices = LAYERS[layer]
        max_rank, ranks = rank_list(spec, adapters)
        problem = make_problem(tokens, hidden, slices, ranks, max_rank, device, seed=i)
        gather_ok = tokens * max_rank * (hidden + sum(slices)) * 2 <= GATHER_LIMIT
        times = time_backends(problem, slices, args.backends, device, gather_ok)
        floor, bound = floor_us(tokens, hidden, slices, ranks, ceilings)
        rows.append({
            "layer": layer, "tokens": tokens, "adapters": adapters, "ranks": spec, "us": times,
            "base_gemm_us": base_gemm_us(tokens, hidden, sum(slices), device, gemm_cache),
            "floor_us": floor, "bound": bound,
        })
        del problem
        if i % 25 == 24:
            checkpoint(rows)
    return rows


def run_decode(args, device) -> list[dict]:
    """One decoder layer's four fused LoRA launches vs its GEMMs: 32 adapters of rank 16."""
    cache: dict = {}
    rows = []
    for tokens, (name, (hidden, slices)) in itertools.product(DECODE_TOKENS, FUSED.items()):
        adapters = min(32, tokens)
        problem = make_problem(tokens, hidden, slices, [16] * 32, 16, device, seed=tokens)
        times = time_backends(problem, slices, [b for b in args.backends if b != "torch"], device, True)
        rows.append({"launch": name, "tokens": tokens, "active_adapters": adapters, "us": times,
                     "base_gemm_us": base_gemm_us(tokens, hidden, sum(slices), device, cache)})
    return rows


def panel_adapters(target: int, tokens: int) -> int:
    """The adapter count shown for `target` at `tokens`: the largest grid value not above either."""
    return max(a for a in ADAPTERS if a <= min(target, tokens))


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(result: dict) -> dict:
    grid = result["grid"]
    ratios = []
    for row in grid:
        us = row["us"]
        best = min((us[b] for b in BASELINES if us.get(b) is not None), default=None)
        if best is not None and us.get("atmm"):
            ratios.append((best / us["atmm"], row))
    low = [dict(r[1], speedup=r[0]) for r in ratios if r[0] < 0.95]
    # "Large": enough work (floor >= 50 us) that two launches' fixed latency cannot bound the time.
    large = sorted(row["floor_us"] / row["us"]["atmm"] for row in grid if row["floor_us"] >= 50)
    tuned = [row["us"]["atmm_heuristic"] / row["us"]["atmm"] for row in grid if row["us"].get("atmm_heuristic")]
    tokens = sorted({row["tokens"] for row in grid})
    by_tokens = {str(t): geomean(r for r, row in ratios if row["tokens"] == t) for t in tokens}
    decode = {}
    for tokens in DECODE_TOKENS:
        rows = [r for r in result["decode"] if r["tokens"] == tokens]
        lora, base = sum(r["us"]["atmm"] for r in rows), sum(r["base_gemm_us"] for r in rows)
        decode[str(tokens)] = {
            "lora_us": lora, "base_gemm_us": base, "ratio": lora / base,
            "per_launch": {r["launch"]: r["us"]["atmm"] / r["base_gemm_us"] for r in rows},
        }
    return {
        "cases": len(grid),
        "atmm_vs_best_baseline_geomean": geomean(r for r, _ in ratios),
        "atmm_vs_best_baseline_min": min(r for r, _ in ratios),
        "atmm_vs_best_baseline_by_tokens": by_tokens,
        "cases_below_0.95": low,
        "large_cases": len(large),
        "roofline_fraction_large_min": large[0] if large else float("nan"),
        "roofline_fraction_large_median": large[len(large) // 2] if large else float("nan"),
        "roofline_fraction_large_at_least_75": sum(f >= 0.75 for f in large) / max(len(large), 1),
        "tuned_vs_heuristic_geomean": geomean(tuned),
        "tuned_vs_heuristic_min": min(tuned, default=float("nan")),
        "tuned_slower_than_heuristic_by_5pct": sum(t < 1 / 1.05 for t in tuned),
        "decode_layer": decode,
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("64", 4), ("mixed", 16)]
    fig, axes = plt.subplots(len(panels), len(LAYERS), figsize=(4 * len(LAYERS), 3.4 * len(panels)), squeeze=False)
    styles = {"atmm": "o-", "atmm_heuristic": "o:", "sgmv": "s-", "bgmv": "^-", "gather": "v-", "torch": "x-"}
    for (spec, adapters), row_axes in zip(panels, axes):
        for layer, ax in zip(LAYERS, row_axes):
            rows = sorted((r for r in result["grid"] if r["layer"] == layer and r["ranks"] == spec
                           and r["adapters"] == panel_adapters(adapters, r["tokens"])), key=lambda r: r["tokens"])
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


def markdown(result: dict) -> str:
    s = result["summary"]
    lines = [
        f"Device {result['device']}, {result['date']}, commit {result['commit']}, torch {result['torch']}, "
        f"triton {result['triton']}. Ceilings measured in the same run: copy {result['ceilings']['hbm_gbps']:.0f} "
        f"GB/s, bf16 matmul {result['ceilings']['bf16_tflops']:.0f} TFLOP/s.",
        "",
        "| target | measured |",
        "| --- | --- |",
        f"| atmm vs best of sgmv/bgmv/gather, geomean over {s['cases']} cases (goal >= 1.5x) | "
        f"{s['atmm_vs_best_baseline_geomean']:.2f}x |",
        f"| worst case (goal >= 0.95x) | {s['atmm_vs_best_baseline_min']:.2f}x "
        f"({len(s['cases_below_0.95'])} cases below 0.95x) |",
        f"| fraction of the roofline floor, {s['large_cases']} large cases (floor >= 50 us; goal >= 75%) | "
        f"median {s['roofline_fraction_large_median']:.0%}, min {s['roofline_fraction_large_min']:.0%}, "
        f"{s['roofline_fraction_large_at_least_75']:.0%} of cases >= 75% |",
        f"| tuned vs heuristic tiles, geomean over the grid | {s['tuned_vs_heuristic_geomean']:.2f}x "
        f"(worst {s['tuned_vs_heuristic_min']:.2f}x; tuned >5% slower in {s['tuned_slower_than_heuristic_by_5pct']} "
        f"cases) |",
    ]
    for tokens, d in s["decode_layer"].items():
        lines.append(f"| decode layer, {tokens} tokens, 32 adapters r16: LoRA / base GEMM (goal <= 20%) | "
                     f"{d['ratio']:.0%} ({d['lora_us']:.1f} / {d['base_gemm_us']:.1f} us) |")
    lines += ["", "atmm vs best baseline, geomean by tokens: " + ", ".join(
        f"{t}: {v:.2f}x" for t, v in s["atmm_vs_best_baseline_by_tokens"].items())]
    names = [b for b in BACKENDS if any(r["us"].get(b) for r in result["grid"])]
    lines += ["", "Mixed ranks (8-128), 16 adapters (fewer when there are fewer tokens); times in us:", "",
              "| layer | tokens | " + " | ".join(names) + " | base GEMM | atmm % of floor |",
              "| --- | ---: | " + " | ".join("---:" for _ in names) + " | ---: | ---: |"]
    for r in result["grid"]:
        if r["ranks"] == "mixed" and r["adapters"] == panel_adapters(16, r["tokens"]):
            cells = " | ".join(f"{r['us'][n]:.1f}" if r["us"].get(n) else "-" for n in names)
            lines.append(f"| {r['layer']} | {r['tokens']} | {cells} | {r['base_gemm_us']:.1f} | "
                         f"{r['floor_us'] / r['us']['atmm']:.0%} |")
    lines += ["", "One decoder layer's fused launches, 32 adapters of rank 16 (atmm us / base GEMM us):", "",
              "| tokens | qkv | o | gate_up | down |", "| ---: | --- | --- | --- | --- |"]
    for tokens in DECODE_TOKENS:
        rows = {r["launch"]: r for r in result["decode"] if r["tokens"] == tokens}
        lines.append(f"| {tokens} | " + " | ".join(
            f"{rows[k]['us']['atmm']:.1f} / {rows[k]['base_gemm_us']:.1f}" for k in FUSED) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON to write (default: benchmarks/results/lora_ops_<gpu>.json)")
    p.add_argument("--commit", default="unknown")
    p.add_argument("--layers", nargs="+", default=list(LAYERS), choices=list(LAYERS))
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--adapters", nargs="+", type=int, default=list(ADAPTERS))
    p.add_argument("--ranks", nargs="+", default=list(RANKS), choices=list(RANKS))
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=list(BACKENDS))
    p.add_argument("--report", type=Path, help="only re-plot and print the markdown of an existing JSON")
    args = p.parse_args()
    if args.report:
        result = json.loads(args.report.read_text())
        result["summary"] = summarize(result)
        plot(result, args.report.with_suffix(".png"))
        print(markdown(result))
        return

    import torch
    import triton

    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    ceilings = measure_ceilings(device)
    slug = "h100" if "H100" in name else "h200" if "H200" in name else name.replace(" ", "_").lower()
    out = args.out or Path(__file__).parent / "results" / f"lora_ops_{slug}.json"
    result = {
        "device": name, "date": datetime.date.today().isoformat(), "commit": args.commit,
        "torch": torch.__version__, "triton": triton.__version__, "ceilings": ceilings, "decode": [],
    }

    def checkpoint(grid: list[dict]) -> None:
        """Partial results survive an interrupted run."""
        out.write_text(json.dumps(dict(result, grid=grid), indent=1) + "\n")

    result["decode"] = run_decode(args, device)
    result["grid"] = run_grid(args, device, ceilings, checkpoint)
    result["summary"] = summarize(result)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
