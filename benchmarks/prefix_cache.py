"""Prefix caching across adapters (issue 16, acceptance 4): a 2,000-token system prompt shared by requests for 8
adapters, each request with its own 64-token question. The first request of each adapter misses (KV is cached per
adapter registration: another adapter's blocks are never reused), the following ones hit everything but their
question. Reported: time to first token on a miss and on a hit, one request at a time, and their ratio (target: hit
<= 1/3 of miss), with the cache's hit counters.

    python -m benchmarks.prefix_cache --workdir /tmp/valora-bench     # H100: Qwen2-VL-7B shapes, random bf16
    python -m benchmarks.prefix_cache --quick                         # CPU: a tiny Qwen2-VL, to check it runs

TTFT is the wall time from `add_request` (token-id prompts: no preprocessing) to the step that returns the first
token, with the engine's default chunked-prefill budget (2048 tokens: a miss takes two steps). Requests alternate
between adapters; under the `valora` policy a lone request may be served merged, so a TTFT can include a mode
switch: the result counts them (`--scheduler slora` never merges).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import build_checkpoint, write_result
from valora import LLM, LoRARequest, SamplingParams


def ttft(llm: LLM, rid: str, ids: list[int], lora: LoRARequest) -> tuple[float, int]:
    """Seconds to the first token of one request alone, and the prompt tokens the prefix cache gave it."""
    engine = llm.engine
    t = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1), lora)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.outputs[0].token_ids:
                elapsed = time.perf_counter() - t
                while engine.has_unfinished_requests():
                    engine.step()
                return elapsed, out.num_cached_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-bench"))
    ap.add_argument("--quick", action="store_true", help="a tiny model on the CPU, small counts")
    ap.add_argument("--system-tokens", type=int, default=None, help="shared prefix (default: 2000; quick: 200)")
    ap.add_argument("--question-tokens", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=None, help="adapters sharing the prefix (default: 8; quick: 2)")
    ap.add_argument("--hits", type=int, default=4, help="requests per adapter after its first")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--scheduler", default="valora")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    q = args.quick
    system_tokens = args.system_tokens or (200 if q else 2000)
    num_adapters = args.adapters or (2 if q else 8)
    model_dir, adapter_dirs = build_checkpoint(args.workdir, num_adapters, args.rank, quick=q)
    llm = LLM(str(model_dir), enable_lora=True, max_loras=num_adapters, max_lora_rank=args.rank, max_model_len=4096,
              scheduler=args.scheduler,
              **(dict(device="cpu", num_kv_blocks=1024) if q else dict(gpu_memory_utilization=0.8)))
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    vocab = min(5000, llm.engine.core.model.decoder_config.vocab_size)
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:  # random ids past the special tokens
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    for i, lora in enumerate(loras):  # warm-up: adapters in their slots, kernels compiled for long and short prompts
        ttft(llm, f"warm{i}", tokens(system_tokens + args.question_tokens), lora)
        ttft(llm, f"warm{i}-short", tokens(args.question_tokens), lora)
    switches = llm.engine.core.stats().num_switches
    system = tokens(system_tokens)
    rows = []
    for k in range(1 + args.hits):
        for lora in loras:
            seconds, cached = ttft(llm, f"{lora.lora_name}-{k}", system + tokens(args.question_tokens), lora)
            rows.append({"adapter": lora.lora_name, "request": k, "ttft_ms": seconds * 1e3, "cached_tokens": cached})
            print(json.dumps(rows[-1]), flush=True)
    miss = [r["ttft_ms"] for r in rows if r["request"] == 0]
    hit = [r["ttft_ms"] for r in rows if r["request"] > 0]
    stats = llm.engine.core.stats()
    result = {
        "model": "tiny qwen2-vl (cpu)" if q else "qwen2-vl-7b shapes, random bf16",
        "system_tokens": system_tokens, "question_tokens": args.question_tokens, "adapters": num_adapters,
        "rank": args.rank, "max_num_batched_tokens": llm.engine.core.max_batched_tokens,
        "miss_ttft_ms": {"mean": statistics.fmean(miss), "p50": statistics.median(miss)},
        "hit_ttft_ms": {"mean": statistics.fmean(hit), "p50": statistics.median(hit)},
        "hit_over_miss_p50": statistics.median(hit) / statistics.median(miss),
        "misses_cached_nothing_of_the_system_prompt": all(r["cached_tokens"] < 16 for r in rows if r["request"] == 0),
        "prefix_cache_queries": stats.prefix_cache_queries, "prefix_cache_hits": stats.prefix_cache_hits,
        "scheduler": args.scheduler, "mode_switches_while_timed": stats.num_switches - switches,
        "requests": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "requests"}), flush=True)
    path = write_result(args.name or ("prefix_cache_cpu_quick" if q else "prefix_cache"), result)
    print(f"written {path}")


if __name__ == "__main__":
    main()
