"""Mode switch on the GPU: Qwen2-VL-7B shapes (28 layers; q,k,v,o,gate,up,down targeted; rank 64; bf16).

Times merged <-> unmerged and a hot-adapter change through the engine's own ModeSwitcher (a merge replays its
captured graph on CUDA; `eager` is the same merge issued from Python, launch by launch), next to the memory
roofline of the bytes a switch must move (read W, write W' for every targeted layer, at the measured copy
bandwidth), and next to the in-place add-then-subtract that dLoRA and peft use, with the drift it leaves. After
`--switches` more switches (merge A, unmerge, merge B, ...), the checkpoint weights must equal their copy from before
the first switch and A's merged weights the first ones made, bit for bit (issue 18: 1,000 switches).

    python -m benchmarks.mode_switch                                     # both target sets (about a minute)
    python -m benchmarks.mode_switch --targets all_linears --switches 1000   # issue 18's acceptance 4
    python -m benchmarks.mode_switch --quick                             # a tiny model on the CPU (the interpreter)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import LM_LINEARS, QWEN2_VL_7B, device_rates, synchronize, write_result
from valora.config import LoRAConfig
from valora.lora.manager import LoRAManager
from valora.lora.request import LoRARequest
from valora.models.qwen2_vl import Qwen2VLForConditionalGeneration
from valora.orchestrator.modes import ModeSwitcher
from valora.testing.checkpoints import peft_target_regex, save_random_adapter
from valora.testing.families import qwen2_vl_config

TARGETS = {"all_linears": LM_LINEARS, "attention_only": ("q_proj", "k_proj", "v_proj", "o_proj")}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.02)  # --quick


def timed(fn) -> float:
    synchronize()
    t = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t


def build(targets: tuple[str, ...], workdir: Path, device: torch.device, dtype: torch.dtype, rank: int,
          quick: bool):
    shape = dict(TINY if quick else QWEN2_VL_7B)
    ids = dict(bos=0, eos=2, pad=0, image=5, video=6, vision_start=3, vision_end=4)  # no tokenizer needed here
    cfg = qwen2_vl_config(shape.pop("vocab_size"), ids, **shape)
    cfg.save_pretrained(workdir / "model")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(cfg)
    torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    manager = LoRAManager(model, model.mapper, LoRAConfig(max_loras=2, max_lora_rank=rank), dtype, device)
    for name, seed in (("A", 1), ("B", 2)):
        path = save_random_adapter(workdir / "model", workdir / name, r=rank, seed=seed, device=str(device),
                                   dtype=dtype, target_modules=peft_target_regex(targets))
        manager.register(LoRARequest(name, seed, str(path)))
    slots = manager.activate(["A", "B"])
    switcher = ModeSwitcher(manager)
    switcher.reserve()
    return manager, switcher, slots


def measure(targets: tuple[str, ...], bandwidth: float, device: torch.device, dtype: torch.dtype, rank: int,
            quick: bool, repeats: int = 10, switches: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as d:
        manager, switcher, slots = build(targets, Path(d), device, dtype, rank, quick)
        layers = [manager.layers[p] for p in manager.info["A"].targets]
        merged_bytes = sum(2 * layer.weight.numel() * layer.weight.element_size() for layer in layers)
        pristine = [layer.weight.clone() for layer in layers]
        switcher.switch("A", slots["A"])  # warm-up (cuBLAS handles, allocator)
        first_a = [layer.merged_weight.clone() for layer in layers]
        switcher.switch("B", slots["B"])
        merge, unmerge, remerge, change = [], [], [], []
        for _ in range(repeats):
            switcher.switch(None, None)
            merge.append(timed(lambda: switcher.switch("A", slots["A"])))  # A was not held: full pass
            unmerge.append(timed(lambda: switcher.switch(None, None)))
            remerge.append(timed(lambda: switcher.switch("A", slots["A"])))  # A still held: free
            change.append(timed(lambda: switcher.switch("B", slots["B"])))
        switcher.graphs, eager = False, []  # the same merges issued from Python, launch by launch
        for _ in range(repeats):
            switcher.switch("B", slots["B"])
            eager.append(timed(lambda: switcher.switch("A", slots["A"])))
        switcher.graphs = device.type == "cuda"
        cycle = (("A", slots["A"]), (None, None), ("B", slots["B"]))
        t = time.perf_counter()
        for i in range(switches):
            switcher.switch(*cycle[i % 3])
        synchronize()
        switches_s = time.perf_counter() - t
        switcher.switch("A", slots["A"])  # a full merge unless the cycle ended on A
        exact = all(torch.equal(layer.weight, w) for layer, w in zip(layers, pristine)) and all(
            torch.equal(layer.merged_weight, w) for layer, w in zip(layers, first_a))
        del pristine, first_a
        switcher.switch(None, None)
        inplace, drift = inplace_baseline(manager, layers, slots["A"], manager.slot_scale[slots["A"]])
        roofline = merged_bytes / bandwidth
        ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        return {
            "targets": list(targets), "layers": len(layers), "rank": rank, "bytes_moved": merged_bytes,
            "roofline_ms": roofline * 1e3,
            "merge_ms": ms(merge), "unmerge_ms": ms(unmerge), "remerge_held_ms": ms(remerge),
            "hot_change_ms": ms(change), "merge_vs_roofline": ms(merge) / (roofline * 1e3),
            "merge_eager_ms": ms(eager), "merge_graphs": switcher.graphs,
            "switches": 6 * repeats + switches + 3, "extra_switches_s": switches_s,
            "weights_bit_identical_after_switches": exact,
            "inplace_add_sub_ms": inplace, "inplace_drift_fraction_after_20": drift,
        }


def inplace_baseline(manager, layers, slot: int, scale: float) -> tuple[float, float]:
    """dLoRA / peft: W += s·B·A to merge, W -= s·B·A to unmerge, in bf16. Returns the time of one merge+unmerge
    pair and the fraction of weight elements changed after 20 pairs."""
    original = [layer.weight.clone() for layer in layers]
    deltas = []
    for layer in layers:
        ranks = manager.slot_ranks[slot][next(p for p, m in manager.layers.items() if m is layer)]
        rows = []
        for j, r in enumerate(ranks):
            off = layer.slice_offset(j)
            b = layer.lora_b[slot, off : off + layer.out_slices[j], :r]
            a = layer.lora_a[slot, j * layer.max_rank : j * layer.max_rank + r]
            rows.append((slice(off, off + layer.out_slices[j]), b, a))
        deltas.append(rows)

    def pair() -> None:
        for layer, rows in zip(layers, deltas):
            for sl, b, a in rows:
                layer.weight.data[sl].addmm_(b, a, alpha=scale)
        for layer, rows in zip(layers, deltas):
            for sl, b, a in rows:
                layer.weight.data[sl].addmm_(b, a, alpha=-scale)

    times = [timed(pair) for _ in range(20)]
    changed = sum(int((layer.weight != o).sum()) for layer, o in zip(layers, original))
    total = sum(o.numel() for o in original)
    for layer, o in zip(layers, original):
        layer.weight.data.copy_(o)
    return statistics.median(times) * 1e3, changed / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--switches", type=int, default=0,
                    help="switches made after the timed ones, before the bit-exactness check (issue 18: 1000)")
    ap.add_argument("--quick", action="store_true", help="a tiny float32 model on the CPU: checks the script only")
    ap.add_argument("--name", default="mode_switch")
    args = ap.parse_args()
    device, dtype = (torch.device("cpu"), torch.float32) if args.quick else (torch.device("cuda"), torch.bfloat16)
    bw = device_rates(device, args.quick)["copy_bytes_per_s"]
    rows = {"copy_bandwidth_GBps": bw / 1e9, "quick": args.quick}
    for key in args.targets:
        rows[key] = measure(TARGETS[key], bw, device, dtype, args.rank, args.quick, repeats=2 if args.quick else 10,
                            switches=args.switches)
    path = write_result(args.name, rows)
    print(f"written {path}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    print(f"{'targets':16s} {'merge':>8s} {'eager':>8s} {'unmerge':>8s} {'re-merge':>9s} {'A->B':>8s} {'roofline':>9s} "
          f"{'in-place pair':>13s} {'drift@20':>9s} exact after")
    for key in args.targets:
        r = rows[key]
        print(f"{key:16s} {r['merge_ms']:8.2f} {r['merge_eager_ms']:8.2f} {r['unmerge_ms']:8.3f} "
              f"{r['remerge_held_ms']:9.3f} "
              f"{r['hot_change_ms']:8.2f} {r['roofline_ms']:9.2f} {r['inplace_add_sub_ms']:13.2f} "
              f"{r['inplace_drift_fraction_after_20']:9.4f} {r['weights_bit_identical_after_switches']} "
              f"({r['switches']} switches)")


if __name__ == "__main__":
    main()
