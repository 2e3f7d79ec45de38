"""Engine speed on the GPU (issue 11): decode, prefill and TTFT of a Qwen2-VL-7B-shaped checkpoint with random bf16
weights, side by side with transformers `generate` (+ peft for adapter rows) on the same checkpoint, every row next
to its roofline, plus the GPU's idle time between decode steps and a kernel profile of one step.

    python -m benchmarks.engine_speed --workdir /tmp/speed            # everything (about 8 minutes on an H100)
    python -m benchmarks.engine_speed --skip-hf --batches 1,32        # ours only, fewer rows
    python -m benchmarks.engine_speed --targets-only                  # only what issue 18's targets read (below)
    python -m benchmarks.engine_speed --targets-only --sync-rows      # ... and the same with async scheduling off
    python -m benchmarks.engine_speed --quick                         # the same on a tiny model on the CPU

Targets (issue 18), in the JSON's `targets`: batch 1 without adapters <= 1.25x its roofline; batch 32 with 32
rank-16 adapters <= 1.3x; the GPU idle <= 5% of a decode step at batch 32; one adapter at batch 1 <= 0.3 ms over
none; start-up (graph capture included) under 30 s.

Roofline of a row: the larger of (bytes it must read) / (measured copy bandwidth) and (FLOPs) / (measured bf16
matmul rate). A decode step reads the LM weights, the distinct adapters in the batch and every sequence's KV; a
prefill reads the weights once and does 2 x params x tokens FLOPs plus causal attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import build_checkpoint, device_rates, synchronize, timed_steps, write_result
from benchmarks.engine_smoke import hf_decode
from benchmarks.profiling import busy_time
from valora import LLM, LoRARequest, SamplingParams


@dataclass(frozen=True)
class Dims:
    """The language model's sizes, from which a row's bytes and FLOPs follow."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_heads: int
    head_dim: int
    bytes: int = 2  # bf16

    @staticmethod
    def of(config: dict, bytes: int = 2) -> Dims:
        text = config.get("text_config") or config
        get = lambda k: text.get(k, config.get(k))  # noqa: E731
        return Dims(get("hidden_size"), get("intermediate_size"), get("num_hidden_layers"), get("vocab_size"),
                    get("num_key_value_heads"), get("hidden_size") // get("num_attention_heads"), bytes)

    @property
    def layer_shapes(self) -> dict[str, tuple[int, int]]:  # (in, out) of every LoRA-targeted linear
        h, kv, ff = self.hidden, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, ff),
                "up_proj": (h, ff), "down_proj": (ff, h)}

    @property
    def lm_params(self) -> int:  # linears + LM head (embedding: rows only)
        return self.layers * sum(i * o for i, o in self.layer_shapes.values()) + self.hidden * self.vocab

    def adapter_bytes(self, rank: int) -> int:
        return self.layers * sum(rank * (i + o) for i, o in self.layer_shapes.values()) * self.bytes

    def kv_bytes(self, tokens: int) -> int:
        return tokens * self.layers * 2 * self.kv_heads * self.head_dim * self.bytes



# -- the device ------------------------------------------------------------------------------------------------
def measure_device(quick: bool = False) -> dict:
    """The device's copy bandwidth and bf16 matmul rate (`common.device_rates`), under this result's names."""
    rates = device_rates("cpu" if quick else "cuda", quick)
    return {"copy_bandwidth_bytes_per_s": rates["copy_bytes_per_s"],
            "bf16_matmul_flops_per_s": rates["matmul_flops_per_s"]}


def roofline(dev: dict, nbytes: float, flops: float) -> dict:
    t_bytes = nbytes / dev["copy_bandwidth_bytes_per_s"]
    t_flops = flops / dev["bf16_matmul_flops_per_s"]
    return {"roofline_ms": max(t_bytes, t_flops) * 1e3, "bound": "memory" if t_bytes >= t_flops else "compute",
            "bytes": nbytes, "flops": flops}


def decode_roofline(dev: dict, dims: Dims, batch: int, context: int, adapters: int, rank: int) -> dict:
    nbytes = dims.lm_params * dims.bytes + adapters * dims.adapter_bytes(rank) + dims.kv_bytes(batch * context)
    flops = 2 * dims.lm_params * batch + 4 * batch * context * dims.layers * dims.hidden
    return roofline(dev, nbytes, flops)


def prefill_roofline(dev: dict, dims: Dims, tokens: int) -> dict:
    attn = 2 * tokens * tokens * dims.layers * dims.hidden  # causal: half of 4 * T^2 * heads * head_dim
    return roofline(dev, dims.lm_params * dims.bytes + dims.kv_bytes(tokens), 2 * dims.lm_params * tokens + attn)


# -- the prompts ----------------------------------------------------------------------------------------------
PROMPT_IDS = (10, 5000)  # random prompt token ids are drawn from this range (--quick: the tiny vocabulary's)


def token_prompts(batch: int, length: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(*PROMPT_IDS, (length,), generator=g).tolist()} for _ in range(batch)]


# -- ours ------------------------------------------------------------------------------------------------------
def steps_of(llm: LLM, prompts: list, loras: list, max_tokens: int, sync: bool = True) -> list[float]:
    """Wall time of every engine step until all requests finish (`benchmarks.common.timed_steps`)."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        engine.add_request(f"r{i}-{time.monotonic_ns()}", p, params, lr)
    return timed_steps(engine, sync)


def ours_decode(llm: LLM, batch: int, context: int, loras: list, steps: int) -> float:
    """Median decode step once every request is past its prefill (the last `steps` steps)."""
    times = steps_of(llm, token_prompts(batch, context), loras, steps * 2, sync=False)  # the pipeline's period
    tail = sorted(times[-steps:])
    return tail[len(tail) // 2]


def ours_prefill(llm: LLM, tokens: int, repeats: int = 3) -> float:
    best = float("inf")
    for k in range(repeats):
        times = steps_of(llm, token_prompts(1, tokens, seed=100 + k), [None], 1)
        best = min(best, sum(times))
    return best


def image_request(llm: LLM, seed: int, text: str = "Describe the image.") -> dict:
    messages, image = hf_messages(seed, text)
    messages[0]["content"][0]["image"] = image
    return llm.chat_prompt(messages)


def graph_parity(llm: LLM, loras: list, requests: int = 16, tokens: int = 32) -> dict:
    """Greedy outputs of a mixed batch (8 adapters, images and text) replayed from CUDA graphs, vs the same padded
    decode batches run eagerly (`--enforce-eager`), and vs plain unpadded eager steps (different GEMM and LoRA tile
    shapes: bf16 rounding differs, so a random model's near-tied logits can flip)."""
    prompts = [image_request(llm, 1000 + i, f"Question {i}: what is shown?") if i % 2 else
               token_prompts(1, 40 + 7 * i, seed=i)[0] for i in range(requests)]
    mix = [loras[i % 8] if i % 4 else None for i in range(requests)]
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    runner = llm.engine.core.runner
    graphs = runner.graphs
    outs = {}
    for mode in ("graphs", "eager", "unpadded_eager"):
        graphs.capture = mode == "graphs"
        runner.graphs = None if mode == "unpadded_eager" else graphs
        try:
            outs[mode] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=mix,
                                                                       use_tqdm=False)]
        finally:
            graphs.capture, runner.graphs = True, graphs
    result = {"requests": requests, "tokens_each": tokens}
    for mode in ("eager", "unpadded_eager"):
        pairs = list(zip(outs["graphs"], outs[mode]))
        result[mode] = {"identical_requests": sum(a == b for a, b in pairs),
                        "identical_tokens": sum(x == y for a, b in pairs for x, y in zip(a, b))}
    return result


def ours_ttft(llm: LLM, repeats: int = 5) -> float:
    times = []
    for k in range(repeats):
        prompt = image_request(llm, seed=k)  # a new image each time: no embedding-cache hits
        times.append(sum(steps_of(llm, [prompt], [None], 1)))
    return sorted(times)[len(times) // 2]


def idle_and_profile(llm: LLM, batch: int, context: int, loras: list, steps: int = 16) -> dict:
    """GPU idle share between the first and the last kernel of `steps` decode steps (`idle_share`: the gaps between
    and within steps), the same over the wall time of the loop (`idle_share_of_wall`, which adds the first step's
    launch before any kernel and the closing synchronisation), and kernel time per step."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i, (p, lr) in enumerate(zip(token_prompts(batch, context), loras)):
        engine.add_request(f"p{i}", p, params, lr)
    for _ in range(4):  # prefills and the first decodes
        engine.step()
    synchronize()
    gpu = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize()
        wall = time.perf_counter() - t
    while engine.has_unfinished_requests():
        engine.step()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
    busy, _ = busy_time(spans)
    window = (spans[-1][1] - spans[0][0]) if spans else 0.0
    by_name: dict[str, float] = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + (e.time_range.end - e.time_range.start)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    return {"batch": batch, "steps": steps, "wall_ms_per_step": wall / steps * 1e3,
            "gpu_busy_ms_per_step": busy / steps / 1e3, "gpu_window_ms_per_step": window / steps / 1e3,
            "idle_share": 1 - busy / window if window and gpu else None,
            "idle_share_of_wall": 1 - busy / 1e3 / (wall * 1e3) if wall and gpu else None,
            "kernels_ms_per_step": {name[:90]: us / steps / 1e3 for name, us in top}}


def host_profile(llm: LLM, batch: int, context: int, loras: list, steps: int = 20) -> list[str]:
    """Where the host's share of a decode step goes: cProfile of `steps` steps, the top functions by own time."""
    import cProfile
    import io
    import pstats

    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
    for i, (p, lr) in enumerate(zip(token_prompts(batch, context), loras)):
        engine.add_request(f"h{i}", p, params, lr)
    for _ in range(4):
        engine.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        engine.step()
    prof.disable()
    while engine.has_unfinished_requests():
        engine.step()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return [line[:160] for line in text.getvalue().splitlines() if line.strip()]


# -- transformers ---------------------------------------------------------------------------------------------
def hf_prefill(model, tokens: int) -> float:
    ids = torch.tensor([token_prompts(1, tokens, seed=100)[0]["prompt_token_ids"]], device="cuda")
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def hf_ttft(model, model_dir: Path) -> float:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    times = []
    for k in range(5):
        messages, image = hf_messages(k)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(text=[text], images=[image], return_tensors="pt").to("cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def hf_messages(seed: int, text: str = "Describe the image."):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    image = Image.fromarray(torch.randint(0, 256, (448, 448, 3), generator=g, dtype=torch.uint8).numpy())
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], image


# -- the run ---------------------------------------------------------------------------------------------------
def ours(args, model_dir: Path, adapter_dirs: list[Path], batches: list[int], prefills: list[int],
         result: dict) -> None:
    dev, dims = result["device_rates"], Dims(**result["dims"])
    t = time.perf_counter()
    llm = LLM(str(model_dir), enable_lora=True, max_loras=32, max_lora_rank=args.rank,
              max_model_len=max([*prefills, args.context + 2 * args.steps]) + 512, gpu_memory_utilization=0.85,
              max_num_seqs=max(args.max_num_seqs, *batches), enforce_eager=args.enforce_eager,
              device="cpu" if args.quick else "auto", async_scheduling=args.async_scheduling)
    result["valora_start_s"] = time.perf_counter() - t
    result["startup_phases_s"] = llm.engine.core.startup.report()  # where the start-up went (engine/startup.py)
    graphs = llm.engine.core.runner.graphs
    if graphs is not None and graphs.capture:
        result["graphs"] = {"captured_at_start": len(graphs.graphs), "capture_s_at_start": graphs.capture_seconds}
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    for lr in loras:
        llm.engine.core.add_lora(lr)
    steps_of(llm, token_prompts(4, 64), [None, loras[0], loras[1], None], 4)  # warm-up
    result["decode"] += decode_rows(args, llm, loras, batches, dev, dims)
    for tokens in prefills:
        ms = ours_prefill(llm, tokens) * 1e3
        row = {"tokens": tokens, "valora_ms": ms, **prefill_roofline(dev, dims, tokens)}
        row["valora_matmul_share"] = row["flops"] / (ms / 1e3) / dev["bf16_matmul_flops_per_s"]
        result["prefill"].append(row)
        print(json.dumps(row), flush=True)
    b = min(max(batches), 32)  # issue 18's idle target is at batch 32 (--targets-only also decodes 64 and 128)
    mixed = [loras[i % len(loras)] for i in range(b)]
    result[f"idle_b{b}_{min(b, len(loras))}_adapters"] = idle_and_profile(llm, b, args.context, mixed)
    result[f"idle_b{b}_no_adapter"] = idle_and_profile(llm, b, args.context, [None] * b)
    if args.sync_rows and args.async_scheduling:  # the same engine and graphs, the synchronous loop
        llm.engine.core.config.scheduler.async_scheduling = False  # read at every step; nothing is in flight now
        result["synchronous"] = {"decode": decode_rows(args, llm, loras, batches, dev, dims),
                                 f"idle_b{b}_{min(b, len(loras))}_adapters": idle_and_profile(
                                     llm, b, args.context, mixed)}
        llm.engine.core.config.scheduler.async_scheduling = True
    if not args.targets_only:
        result["ttft"]["valora_ms"] = ours_ttft(llm) * 1e3
        result["host_profile_b32_32_adapters"] = host_profile(llm, 32, args.context,
                                                              [loras[i % 32] for i in range(32)])
        if graphs is not None and graphs.capture:
            result["graph_parity"] = graph_parity(llm, loras)
    if graphs is not None and graphs.capture:
        result["graphs"].update(captured=len(graphs.graphs), capture_s=graphs.capture_seconds)
    result["targets"] = targets(result)
    print(json.dumps({k: result.get(k) for k in ("ttft", "graphs", "startup_phases_s", "graph_parity", "targets")}),
          flush=True)


def decode_rows(args, llm: LLM, loras: list, batches: list[int], dev: dict, dims: Dims) -> list[dict]:
    """Every (adapter count, batch) decode row next to its roofline."""
    rows = []
    for n in args.adapter_counts:
        for b in batches:
            mix = [loras[i % n] for i in range(b)] if n else [None] * b
            ms = ours_decode(llm, b, args.context, mix, args.steps) * 1e3
            row = {"batch": b, "adapters": n, "distinct_adapters": min(b, n), "valora_ms": ms,
                   "async_scheduling": llm.engine.core.config.scheduler.async_scheduling,
                   **decode_roofline(dev, dims, b, args.context + args.steps, min(b, n), args.rank)}
            row["valora_over_roofline"] = ms / row["roofline_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def targets(result: dict) -> dict:
    """Issue 18's decode targets, read from the rows and profiles of this run (None where a row is missing)."""
    rows = {(r["batch"], r["distinct_adapters"]): r for r in result["decode"]}
    none1, one1, full32 = rows.get((1, 0)), rows.get((1, 1)), rows.get((32, 32))

    def target(value, goal):
        return {"value": value, "goal": goal, "met": value <= goal if value is not None else None}

    idle = result.get("idle_b32_32_adapters") or {}
    return {
        "batch1_no_adapter_over_roofline": target(none1 and none1["valora_over_roofline"], 1.25),
        "batch32_32_adapters_over_roofline": target(full32 and full32["valora_over_roofline"], 1.3),
        "gpu_idle_share_batch32_32_adapters": target(idle.get("idle_share"), 0.05),
        "gpu_idle_share_batch32_no_adapter": target((result.get("idle_b32_no_adapter") or {}).get("idle_share"), 0.05),
        "one_adapter_batch1_over_none_ms": target(one1 and none1 and one1["valora_ms"] - none1["valora_ms"], 0.3),
        "start_s": target(result.get("valora_start_s"), 30.0),
    }


def transformers_rows(args, model_dir: Path, adapter_dirs: list[Path], result: dict) -> None:
    """The same rows through transformers `generate` (+ peft for adapter rows), in a process of their own so
    that none of the engine's memory is still held."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    result["ttft"]["hf_ms"] = hf_ttft(hf, model_dir) * 1e3
    for row in result["prefill"]:
        row["hf_ms"] = hf_prefill(hf, row["tokens"]) * 1e3
        print(json.dumps(row), flush=True)
    for row in result["decode"]:
        if row["adapters"] == 0:
            row["hf_ms"] = hf_decode(hf, row["batch"], args.context, args.hf_steps)["ms_per_step"]
            print(json.dumps(row), flush=True)
    write_result(args.name, result)
    peft = PeftModel.from_pretrained(hf, str(adapter_dirs[0]), adapter_name="a0")
    for i, p in enumerate(adapter_dirs[1:], start=1):
        peft.load_adapter(str(p), adapter_name=f"a{i}")
    for row in result["decode"]:
        if row["adapters"]:
            names = [f"a{i % row['adapters']}" for i in range(row["batch"])]
            row["hf_peft_ms"] = hf_decode(peft, row["batch"], args.context, args.hf_steps, names)["ms_per_step"]
            row["speedup_vs_hf_peft"] = row["hf_peft_ms"] / row["valora_ms"]
            print(json.dumps(row), flush=True)
            write_result(args.name, result)


ADAPTER_COUNTS = (0, 8, 32)  # adapters spread over a batch's rows (`args.adapter_counts`)


def plot(path: Path) -> Path:
    """Decode ms/step against batch size, ours next to the roofline and transformers (+ peft), one panel per
    adapter count; written beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    fig, axes = plt.subplots(1, len(ADAPTER_COUNTS), figsize=(13, 4), sharey=True)
    for ax, n in zip(axes, ADAPTER_COUNTS):
        rows = [r for r in result["decode"] if r["adapters"] == n]
        batches = [r["batch"] for r in rows]
        hf_key = "hf_peft_ms" if n else "hf_ms"
        ax.plot(batches, [r["valora_ms"] for r in rows], "o-", label="VaLoRA")
        ax.plot(batches, [r["roofline_ms"] for r in rows], "k--", label="roofline")
        if all(hf_key in r for r in rows):
            ax.plot(batches, [r[hf_key] for r in rows], "s-", label="transformers" + (" + peft" if n else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch (context 512)")
        ax.set_title(f"{n} adapters of rank {result['rank']}" if n else "no adapter")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("ms per decode step")
    fig.suptitle(f"Decode, Qwen2-VL-7B shapes, bf16, {result['device']} (commit {result['commit']})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-speed"))
    ap.add_argument("--batches", default="1,8,32,64,128")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefills", default="512,2048,8192")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24, help="decode steps timed per row (default: 24)")
    ap.add_argument("--max-num-seqs", type=int, default=128,
                    help="the engine's (at least the largest batch): its graph buckets, so start-up captures what a "
                         "default server does (default: 128)")
    ap.add_argument("--hf-steps", type=int, default=6)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--hf-only", action="store_true", help="add transformers rows to an existing result")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="the engine's asynchronous scheduling (default: on; off measures the synchronous loop)")
    ap.add_argument("--sync-rows", action="store_true",
                    help="then the decode rows and the idle profile at the largest batch again with asynchronous "
                         "scheduling off, on the same engine (`synchronous` in the JSON)")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the rows and profiles issue 18's targets read: batches 1 and 32, none or 32 adapters, "
                         "GPU idle at batch 32, start-up (no prefill, TTFT, host profile, parity)")
    ap.add_argument("--quick", action="store_true", help="--targets-only on a tiny model on the CPU, no transformers")
    ap.add_argument("--name", default="engine_speed")
    ap.add_argument("--plot", type=Path, default=None, metavar="JSON", help="only draw the plot of a result")
    args = ap.parse_args()
    args.adapter_counts = ADAPTER_COUNTS
    if args.plot is not None:
        print(f"written {plot(args.plot)}")
        return
    if args.quick:  # a tiny model on the CPU: checks the script, measures nothing of interest
        args.targets_only, args.skip_hf, args.batches, args.context, args.steps = True, True, "1,32", 32, 4
        args.workdir = args.workdir.with_name(args.workdir.name + "-quick")
    if args.targets_only:
        args.prefills, args.adapter_counts = "", (0, 32)
    model_dir, adapter_dirs = build_checkpoint(args.workdir, max(args.adapter_counts), args.rank, quick=args.quick)
    path = Path(os.environ.get("OUT", "benchmarks/results")) / f"{args.name}.json"
    if args.hf_only:
        transformers_rows(args, model_dir, adapter_dirs, json.loads(path.read_text()))
    else:
        dims = Dims.of(json.loads((model_dir / "config.json").read_text()), 4 if args.quick else 2)
        if args.quick:
            global PROMPT_IDS
            PROMPT_IDS = (10, min(PROMPT_IDS[1], dims.vocab))
        result: dict = {"device_rates": measure_device(args.quick), "context": args.context, "rank": args.rank,
                        "dims": vars(dims), "lm_params": dims.lm_params, "enforce_eager": args.enforce_eager,
                        "async_scheduling": args.async_scheduling,
                        "decode": [], "prefill": [], "ttft": {}}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        print(json.dumps(result["device_rates"]), flush=True)
        ours(args, model_dir, adapter_dirs, [int(b) for b in args.batches.split(",")],
             [int(t) for t in args.prefills.split(",") if t], result)
        write_result(args.name, result)
        if not args.skip_hf:  # the engine's memory is not given back inside this process
            os.execv(sys.executable, [sys.executable, *sys.argv, "--hf-only"])
    print(f"written {path}")


if __name__ == "__main__":
    main()
