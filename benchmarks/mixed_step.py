"""Steps that mix running decodes with a prefill chunk, eager vs replayed from a token-bucket CUDA graph
(engine/token_graphs.py), on a Qwen2-VL-7B-shaped checkpoint with random bf16 weights and 16 adapters of ranks
64/32/16/8 (4 each) on every LM linear, as benchmarks/e2e_sweep.yaml serves it.

    python -m benchmarks.mixed_step --workdir /tmp/speed     # about a minute on an H100 once the checkpoint exists
    python -m benchmarks.mixed_step --quick                  # a tiny model on the CPU: checks the script runs

64 sequences decode across the 16 adapters; each measured step adds one prompt (an adapter's, in turn) of 64, 256 or
1024 tokens, or one 448x448 image with a short question (256 image tokens, the vision pass included), and the token
budget is set to exactly the decodes plus that prompt, so every measured step is 64 decodes + one whole prompt. Each
case runs eagerly (the path such steps took before the token graphs) and from its graph, and the pure decode step at
batch 64 is the reference. Per row: `step_ms`, the median of steps timed one by one (synchronised before and after,
so host and device work add up as in a lone step), and `period_ms`, the mean of the same number of steps run back to
back (with asynchronous scheduling the host prepares a step while the device runs the last one), and whether the
steps ran from a graph. Graph capture (and Triton compilation) happens in warm-up steps, not timed; its seconds are
in the JSON. The sweep's scheduler (`valora`) may merge a hot adapter; this runs S-LoRA's (never merged) with the
atmm kernels, so every step has the same LoRA work.

Results: benchmarks/results/mixed_step.json (--quick: mixed_step_cpu.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import build_checkpoint, synchronize, write_result
from valora import LLM, LoRARequest, SamplingParams
from valora.testing.families import FAMILIES
from valora.testing.images import random_image

RANKS = (64, 32, 16, 8)
DECODE_PROMPT = 32  # tokens of each decoding sequence's prompt


def build(workdir: Path, quick: bool) -> tuple[Path, list[LoRARequest]]:
    adapters: list[Path] = []
    for rank in RANKS:
        model, paths = build_checkpoint(workdir, 4, rank, quick=quick)
        adapters += paths
    return model, [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(adapters)]


def token_prompt(length: int, seed: int, vocab: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"prompt_token_ids": torch.randint(10, min(vocab, 5000), (length,), generator=g).tolist()}


def image_prompt(seed: int) -> dict:
    return {"prompt": f"{FAMILIES['qwen2_vl'].image_prompt} What is in this picture?",
            "multi_modal_data": {"image": random_image(448, 448, seed=seed)}}


class Bench:
    def __init__(self, llm: LLM, adapters: list[LoRARequest], decodes: int) -> None:
        self.llm, self.adapters, self.decodes = llm, adapters, decodes
        self.core = llm.engine.core
        self.runner = self.core.runner
        self.token_graphs = self.runner.token_graphs
        self.vocab = self.core.model.decoder_config.vocab_size
        self.count = 0

    def add(self, prompt: dict, max_tokens: int, lora: LoRARequest) -> None:
        self.count += 1
        self.llm.engine.add_request(f"r{self.count}", prompt, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                             ignore_eos=True), lora)

    def start_decodes(self, max_tokens: int) -> None:
        """`decodes` sequences past their prompts, decoding from here on."""
        self.core.scheduler.max_batched_tokens = self.decodes * DECODE_PROMPT
        for i in range(self.decodes):
            lora = self.adapters[i % len(self.adapters)]
            self.add(token_prompt(DECODE_PROMPT, 1000 + i, self.vocab), max_tokens, lora)
        self.drain()

    def drain(self) -> None:
        """Step until no prompt waits or is being prefilled: only the decodes are left."""
        sched = self.core.scheduler
        while sched.waiting or any(s.num_computed < s.prompt_len for s in sched.running):
            self.llm.engine.step()

    def steps(self, n: int, prompt=None, tokens: int = 0) -> tuple[list[float], float, list[bool]]:
        """(each of n steps timed alone, the mean step of n more back to back, whether each ran from a graph). With a
        prompt, each step gets a new one (one token to generate, so it leaves once prefilled) and a budget of
        exactly the decodes and its `tokens`."""
        self.core.scheduler.max_batched_tokens = self.decodes + tokens
        alone, graphs = [], []
        for i in range(n):
            if prompt is not None:
                self.add(prompt(i), 1, self.adapters[i % len(self.adapters)])
            synchronize()
            t = time.perf_counter()
            self.llm.engine.step()
            synchronize()
            alone.append(time.perf_counter() - t)
            run = self.runner.last_run
            graphs.append(run.graph)
            if prompt is not None and run.decode:
                raise RuntimeError("a measured step had no prefill: the prompt did not fit the budget")
        if prompt is not None:
            for i in range(n):
                self.add(prompt(n + i), 1, self.adapters[i % len(self.adapters)])
        synchronize()
        t = time.perf_counter()
        for _ in range(n):
            self.llm.engine.step()
        synchronize()
        period = (time.perf_counter() - t) / n
        self.drain()  # a prompt left over would run under the next row's budget
        return alone, period, graphs

    def row(self, case: str, mode: str, n: int, warmup: int, prompt=None, tokens: int = 0) -> dict:
        self.runner.token_graphs = self.token_graphs if mode == "graph" else None
        captured = self.token_graphs.capture_seconds
        start = time.perf_counter()
        self.steps(warmup, prompt, tokens)
        warm_s = time.perf_counter() - start
        alone, period, graphs = self.steps(n, prompt, tokens)
        row = {"case": case, "mode": mode, "decodes": self.decodes, "prefill_tokens": tokens,
               "step_ms": statistics.median(alone) * 1e3, "period_ms": period * 1e3, "graph": all(graphs),
               "warmup_s": warm_s, "capture_s": self.token_graphs.capture_seconds - captured}
        print(f"{case:>14} {mode:>5}: step {row['step_ms']:7.2f} ms, period {row['period_ms']:7.2f} ms"
              f"{' (graph)' if row['graph'] else ''}", flush=True)
        return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path.home() / ".cache" / "valora" / "bench")
    ap.add_argument("--quick", action="store_true", help="a tiny model on the CPU (padded static batches, eager)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per row (default 10, --quick 3)")
    args = ap.parse_args()
    quick = args.quick
    n = args.steps or (3 if quick else 10)
    decodes, chunks = (8, (16, 64)) if quick else (64, (64, 256, 1024))
    model, adapters = build(args.workdir, quick)
    device = "cpu" if quick else "cuda"
    t0 = time.perf_counter()
    llm = LLM(str(model), enable_lora=True, max_loras=len(adapters), max_lora_rank=max(RANKS),
              max_cpu_loras=len(adapters), lora_backend="gather" if quick else "atmm", scheduler="slora",
              max_num_seqs=decodes + 8, max_model_len=4096, enable_prefix_caching=False, embed_cache_mb=0,
              device=device, dtype="float32" if quick else "bfloat16")
    if quick:  # no graphs on the CPU: the padded static batches they would replay, run eagerly
        llm.engine.core.runner.enable_cuda_graphs(decodes + 8, len(adapters), capture=False)
    start_s = time.perf_counter() - t0
    bench = Bench(llm, adapters, decodes)
    bench.start_decodes(max_tokens=4096 - DECODE_PROMPT - 1)
    rows = [bench.row("decode only", "graph", n, 2)]
    image_tokens = len(llm.engine.input_processor.process(image_prompt(0))[1].token_ids)
    cases = [(f"chunk {c}", lambda i, c=c: token_prompt(c, i, bench.vocab), c) for c in chunks]
    cases.append(("448px image", lambda i: image_prompt(i), image_tokens))
    for case, prompt, tokens in cases:
        for mode in ("eager", "graph"):
            rows.append(bench.row(case, mode, n, 2, prompt, tokens))
    speedup = {case: next(r for r in rows if r["case"] == case and r["mode"] == "eager")["step_ms"]
               / next(r for r in rows if r["case"] == case and r["mode"] == "graph")["step_ms"]
               for case, _, _ in cases}
    path = write_result("mixed_step_cpu" if quick else "mixed_step", {
        "config": {"decodes": decodes, "adapters": len(adapters), "ranks": list(RANKS), "lora_backend":
                   "gather" if quick else "atmm", "scheduler": "slora", "steps": n, "quick": quick},
        "startup_s": start_s, "rows": rows, "speedup_step": speedup,
        "token_graphs": len(bench.token_graphs.graphs), "token_graph_capture_s": bench.token_graphs.capture_seconds,
    })
    print(f"speedup (eager / graph step): {', '.join(f'{k} {v:.2f}x' for k, v in speedup.items())}; {path}")


if __name__ == "__main__":
    main()
