"""The merge kernel's tile, measured: one decoder layer's all-linear rank-64 merge (Qwen2-VL-7B: fused q/k/v, o,
fused gate/up, down; bf16) under every candidate tile of W and warp count, each inside a CUDA graph as a switch
replays it, next to the copy bandwidth (the roofline: read W, write W') and to the tile `merge_tiles` uses now.

Issue 18's acceptance 4 asks the 28-layer merge for <= 10 ms against a roofline of about 8.6 ms on an H100: the
kernel has to run within ~15% of a plain copy. The winner is worth committing to `merge_tiles` only when it beats
the current tile by more than the run's noise (the script repeats the current tile first and last).

    python -m benchmarks.merge_tiles            # on the GPU (about a minute)
    python -m benchmarks.merge_tiles --quick    # tiny shapes on the CPU (the interpreter): checks the script
"""

from __future__ import annotations

import argparse
import itertools
import os

import torch

from benchmarks.common import QWEN2_VL_7B, device_rates, graph_time_us, write_result

HIDDEN, INTER = QWEN2_VL_7B["hidden_size"], QWEN2_VL_7B["intermediate_size"]
KV = HIDDEN // QWEN2_VL_7B["num_attention_heads"] * QWEN2_VL_7B["num_key_value_heads"]
# (input features, output slices) of the layer's four fused launches
LAUNCHES = ((HIDDEN, (HIDDEN, KV, KV)), (HIDDEN, (HIDDEN,)), (HIDDEN, (INTER, INTER)), (INTER, (HIDDEN,)))
TINY = ((40, (24, 8, 8)), (40, (24,)), (40, (56, 56)), (56, (40,)))
BLOCK_M = (32, 64, 128)
BLOCK_N = (64, 128, 256)
WARPS = (4, 8)


def layer(launches, rank: int, device: torch.device, dtype: torch.dtype) -> list[tuple]:
    """Random W, W', B and A of each launch (A's rows: `rank` per slice, as the LoRA stacks hold them)."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for k, slices in launches:
        m = sum(slices)
        w = torch.randn(m, k, generator=g, device=device, dtype=dtype)
        b = torch.randn(m, rank, generator=g, device=device, dtype=dtype) * 0.01
        a = torch.randn(len(slices) * rank, k, generator=g, device=device, dtype=dtype) * 0.01
        out.append((torch.empty_like(w), w, b, a, slices))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET): checks the script")
    ap.add_argument("--name", default="merge_tiles")
    args = ap.parse_args()
    if args.quick:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from valora.lora.ops.configs import dot_block_r
    from valora.lora.ops.merge import MergeTiles, merge_into, merge_tiles

    device = torch.device("cpu" if args.quick else "cuda")
    dtype = torch.float32 if args.quick else torch.bfloat16
    launches = layer(TINY if args.quick else LAUNCHES, args.rank, device, dtype)
    moved = sum(2 * w.numel() * w.element_size() for _, w, _, _, _ in launches)
    current = merge_tiles(dot_block_r(args.rank))

    def run(tiles: MergeTiles) -> None:
        for out, w, b, a, slices in launches:
            merge_into(out, w, b, a, 0.5, [args.rank] * len(slices), slices, args.rank, tiles)

    def time_us(tiles: MergeTiles) -> float:
        if device.type != "cuda":
            run(tiles)
            return float("nan")
        return graph_time_us(lambda: run(tiles), reps=3, trials=7)

    candidates = [MergeTiles(m, n, w) for m, n, w in itertools.product(BLOCK_M, BLOCK_N, WARPS)]
    if args.quick:
        candidates = candidates[:2]
    def expected(w, b, a, slices) -> torch.Tensor:
        rows = [sum(slices[:j]) for j in range(len(slices) + 1)]
        r = args.rank
        return w.float() + 0.5 * torch.cat([b[rows[j]:rows[j + 1]].float() @ a[j * r:(j + 1) * r].float()
                                            for j in range(len(slices))])

    reference = [(out, expected(w, b, a, slices)) for out, w, b, a, slices in launches]
    gbps = device_rates(device, args.quick)["copy_bytes_per_s"] / 1e9
    rows = [{"tiles": vars(current), "us": time_us(current), "current": True}]
    for tiles in candidates:
        us = time_us(tiles)
        err = max((out.float() - ref).abs().max().item() for out, ref in reference)
        rows.append({"tiles": vars(tiles), "us": us, "max_err": err})
        print(f"{tiles}: {us:.1f} us per layer, {moved / us / 1e3:.0f} GB/s, max err {err:.2e}", flush=True)
    rows.append({"tiles": vars(current), "us": time_us(current), "current": True})
    for row in rows:
        row["gbps"] = moved / row["us"] / 1e3
        row["of_copy"] = row["gbps"] / gbps
    now = [r["us"] for r in rows if r.get("current")]
    best = min((r for r in rows if not r.get("current")), key=lambda r: r["us"])
    layers = QWEN2_VL_7B["num_hidden_layers"]
    summary = {
        "copy_gbps": gbps, "bytes_per_layer": moved, "roofline_ms_all_layers": layers * moved / gbps / 1e6,
        "current": {"tiles": vars(current), "us": now, "ms_all_layers": layers * min(now) / 1e3},
        "best": {**best, "ms_all_layers": layers * best["us"] / 1e3, "over_current": best["us"] / min(now)},
    }
    print(summary, flush=True)
    if not args.quick:
        path = write_result(args.name, {"rank": args.rank, "launches": [[k, list(s)] for k, s in LAUNCHES],
                                        "rows": rows, "summary": summary})
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
