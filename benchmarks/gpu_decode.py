"""Issue 18's GPU measurements in one run (Qwen2-VL-7B shapes, bf16; about 3-4 minutes on an H100), each piece
in a process of its own so that one's GPU memory is free for the next:

1. engine_speed --targets-only --sync-rows: decode at batch 1 without an adapter and with one, batch 32 without
   adapters and with 32 rank-16 ones, each against its roofline; the GPU's idle share between decode steps at
   batch 32; start-up time and the graphs captured in it; then the decode rows and the idle profile again with
   asynchronous scheduling off, on the same engine;
2. lora_ops --sections decode few: one decoder layer's LoRA launches at 16/32/64 tokens with 32 rank-16 adapters
   against its base GEMMs (exact and graph metadata), and one, two or four rank-64 adapters on fused gate/up and
   down_proj against sgmv, bgmv, gather (and the replaced table's plans with --previous-table);
3. mode_switch --targets all_linears --switches 1000: the all-linear rank-64 merge, and the weights bit-exact
   after 1,000 more switches.

The JSON of each piece and `gpu_decode_summary.json` go to $OUT (default benchmarks/results/); a compact summary
with issue 18's targets is printed at the end. A piece that fails is reported and the others still run.

    python -m benchmarks.gpu_decode                                   # on the GPU
    python -m benchmarks.gpu_decode --previous-table /tmp/old.json    # after `valora tune-kernels` replaced a table
    python -m benchmarks.gpu_decode --quick                           # every piece on tiny shapes on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PIECES = ("engine_speed", "lora_ops", "mode_switch")


def commands(args: argparse.Namespace, out: Path) -> dict[str, list[str]]:
    quick = ["--quick"] if args.quick else []
    previous = ["--previous-table", str(args.previous_table)] if args.previous_table else []
    return {
        "engine_speed": ["benchmarks.engine_speed", "--targets-only", "--sync-rows", "--name",
                         "gpu_decode_engine_speed", "--workdir", str(args.workdir), *quick],
        "lora_ops": ["benchmarks.lora_ops", "--sections", "decode", "few", "--out",
                     str(out / "gpu_decode_lora_ops.json"), "--backends", "atmm", "atmm_heuristic", "atmm_previous",
                     "sgmv", *([] if args.quick else ["bgmv"]), "gather", *previous, *quick],
        "mode_switch": ["benchmarks.mode_switch", "--targets", "all_linears", "--switches", "1000", "--name",
                        "gpu_decode_mode_switch", *quick],
    }


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(out: Path, walls: dict[str, dict]) -> dict:
    """The numbers issue 18's acceptance reads, from the pieces' JSON."""
    summary: dict = {"pieces": walls}
    speed = _load(out / "gpu_decode_engine_speed.json")
    if speed:
        row = lambda r: {k: r[k] for k in ("batch", "distinct_adapters", "valora_ms", "roofline_ms",  # noqa: E731
                                            "valora_over_roofline")}
        idle = lambda d: {k: (d.get(k) or {}).get("idle_share") for k in d if k.startswith("idle_")}  # noqa: E731
        summary["engine_speed"] = {
            "device": speed.get("device"), "commit": speed.get("commit"),
            "async": [row(r) for r in speed["decode"]], "async_idle": idle(speed),
            "sync": [row(r) for r in speed.get("synchronous", {}).get("decode", [])],
            "sync_idle": idle(speed.get("synchronous", {})),
            "start_s": speed.get("valora_start_s"), "graphs": speed.get("graphs"), "targets": speed.get("targets")}
    ops = _load(out / "gpu_decode_lora_ops.json")
    if ops and "summary" in ops:
        s = ops["summary"]
        few = s.get("few_vs_reference", {})
        summary["lora_ops"] = {"few_rank": ops.get("few_rank"),
            "decode_layer": {t: {m: d[m]["ratio"] for m in ("exact", "graph") if m in d} | {"goal": 0.25}
                             for t, d in s["decode_layer"].items()},
            "few": {"cases": few.get("cases"), "geomean": few.get("geomean"), "worst": few.get("min"),
                    "slower_by_5pct": [{k: r[k] for k in ("launch", "tokens", "adapters", "reference", "speedup")}
                                       for r in few.get("slower_by_5pct", [])]}}
    switch = _load(out / "gpu_decode_mode_switch.json")
    if switch and "all_linears" in switch:
        r = switch["all_linears"]
        summary["mode_switch"] = {k: r[k] for k in ("merge_ms", "roofline_ms", "hot_change_ms", "switches",
                                                    "weights_bit_identical_after_switches")} | {"goal_ms": 10.0}
    return summary


def report(summary: dict) -> str:
    lines = ["", "== issue 18 on the GPU: summary =="]
    for name, w in summary["pieces"].items():
        lines.append(f"{name:13s} {w['wall_s']:6.1f} s  rc {w['rc']}")
    e = summary.get("engine_speed")
    if e:
        lines.append(f"engine ({e['device']}, commit {e['commit']}): start {e['start_s'] or 0:.1f} s, graphs "
                     f"{e['graphs']}")
        for mode in ("async", "sync"):
            for r in e[mode]:
                lines.append(f"  {mode:5s} batch {r['batch']:3d}, {r['distinct_adapters']:2d} adapters: "
                             f"{r['valora_ms']:7.2f} ms, roofline {r['roofline_ms']:.2f} ms, "
                             f"{r['valora_over_roofline']:.2f}x")
            lines.append(f"  {mode:5s} idle share: " + ", ".join(
                f"{k}={v:.1%}" if v is not None else f"{k}=n/a" for k, v in e[f"{mode}_idle"].items()))
        for k, t in (e["targets"] or {}).items():
            v = t["value"]
            lines.append(f"  target {k}: {v if v is None else round(v, 3)} (goal {t['goal']}) "
                         f"{'met' if t['met'] else 'MISSED' if t['met'] is not None else ''}")
    o = summary.get("lora_ops")
    if o:
        for t, d in o["decode_layer"].items():
            lines.append(f"lora_ops decode layer {t} tokens, LoRA / base GEMM: " + ", ".join(
                f"{m} {d[m]:.0%}" for m in ("exact", "graph") if m in d) + " (goal <= 25%)")
        f = o["few"]
        if f["cases"]:
            lines.append(f"lora_ops one/two/four rank-{o['few_rank']} adapters: atmm vs best reference, "
                         f"{f['cases']} cases, geomean {f['geomean']:.2f}x, worst {f['worst']:.2f}x, "
                         f"{len(f['slower_by_5pct'])} more than 5% slower (goal: none)")
            lines += [f"  slower: {r}" for r in f["slower_by_5pct"]]
    m = summary.get("mode_switch")
    if m:
        lines.append(f"mode_switch all-linear rank-64 merge {m['merge_ms']:.2f} ms (goal <= 10, roofline "
                     f"{m['roofline_ms']:.2f}), A->B {m['hot_change_ms']:.2f} ms, bit-exact after {m['switches']} "
                     f"switches: {m['weights_bit_identical_after_switches']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every piece on tiny shapes on the CPU (checks the scripts)")
    ap.add_argument("--previous-table", type=Path, help="lora_ops: the tuned table the current one replaced")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-speed"),
                    help="engine_speed's checkpoint and adapters (built on first use, about 16 GB)")
    ap.add_argument("--only", nargs="+", choices=PIECES, default=list(PIECES))
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OUT=str(out))
    walls: dict[str, dict] = {}
    start = time.perf_counter()
    for name, cmd in commands(args, out).items():
        if name not in args.only:
            continue
        print(f"== {name}: python -m {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", *cmd], env=env).returncode
        walls[name] = {"wall_s": time.perf_counter() - t, "rc": rc}
    summary = summarize(out, walls)
    summary["total_s"] = time.perf_counter() - start
    (out / "gpu_decode_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(report(summary))
    print(f"total {summary['total_s']:.0f} s; written {out}/gpu_decode_*.json")
    sys.exit(max((w["rc"] for w in walls.values()), default=0) != 0)


if __name__ == "__main__":
    main()
