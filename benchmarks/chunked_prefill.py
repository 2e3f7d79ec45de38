"""Chunked prefill under a burst of images (issue 16, acceptance 3): 32 streams are decoding when 32 image requests
(448x448, 256 visual tokens each) arrive at once. Reported per configuration: the streams' inter-token latency in
their steady state and during the burst (from its arrival until every image request has its first token), p99 over
the burst against the steady median (target with chunking: <= 2x), the image requests' time to first token, and
the images the vision tower encoded per step during the burst.

    python -m benchmarks.chunked_prefill --workdir /tmp/valora-bench      # H100: Qwen2-VL-7B shapes, random bf16
    python -m benchmarks.chunked_prefill --quick                          # CPU: a tiny Qwen2-VL, to check it runs

Every configuration runs on one engine (one load, one set of CUDA graphs): between runs only the scheduler's token
budget, encoder budget and chunking switch (`configure`), and each configuration runs a first, unrecorded burst (its
token-bucket graphs are captured then); the steady state starts once every stream has its first token. Each chunked
token budget runs with every encoder budget of `--encoder-budgets`: `auto` is the engine's default (the token
budget), `none` no encoder budget (a step's chunks may then start any number of images, as before the encoder
budget), a number that many image tokens, `shared` the default encoder budget with images charging the token budget
too (`--encoder-in-token-budget`: a step encodes or prefills within the one budget). Without chunking the budget is
large enough for the whole burst in one step, as before issue 16. The time is the engine's own: the sum of `step()`
durations, so the burst's prompt processing (chat template, image processor: on the caller's thread in
`add_request`) is left out; it moves off the step loop with issue 16's input processor and is reported separately.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.common import build_checkpoint, write_result
from valora import LLM, SamplingParams
from valora.orchestrator.step_log import read_step_log
from valora.testing.images import random_image


def configure(llm: LLM, chunked: bool, budget: int, encoder_budget: int | None = None, shared: bool = False) -> None:
    engine = llm.engine
    engine.core.scheduler.chunked = chunked
    engine.core.scheduler.max_batched_tokens = engine.core.max_batched_tokens = budget
    engine.core.scheduler.max_encoder_tokens = encoder_budget
    engine.core.scheduler.encoder_in_token_budget = shared


def count_encoded_images(llm: LLM) -> list[int]:
    """Images the vision tower encodes in each step from now on (by the runner's own rule, `ImageInputs.to_encode`:
    cached embeddings excluded, an image repeated in the step once), one entry a step."""
    runner, counts = llm.engine.core.runner, []
    forward = runner.forward

    def counting(batch):
        counts.append(0 if batch.images is None else len(batch.images.to_encode()))
        return forward(batch)

    runner.forward = counting
    return counts


SLOWEST_FIELDS = ("duration_s", "graph", "decode", "num_seqs", "num_tokens", "capture_s", "compile_s", "gc_s",
                  "alloc_retries", "launch_s", "outside_s")


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def image_prompt(llm: LLM, seed: int, size: int) -> dict:
    image = random_image(size, size, seed=seed)
    return llm.chat_prompt([{"role": "user", "content": [{"type": "image", "image": image},
                                                         {"type": "text", "text": "Describe the image."}]}])


def run_burst(llm: LLM, args, seed: int, encoded_per_step: list[int], step_log: Path) -> dict:
    """One configuration: streams to steady state, the burst, until every image request is done.
    `encoded_per_step`: `count_encoded_images`'s list; `step_log`: the engine's (`StepRecord`s)."""
    engine = llm.engine
    g = torch.Generator().manual_seed(seed)
    stream_ids = [f"s{seed}-{i}" for i in range(args.streams)]
    vocab = min(5000, engine.core.model.decoder_config.vocab_size)
    for rid in stream_ids:  # random tokens past the special ones: no prefix shared with anything else in the run
        ids = torch.randint(10, vocab, (args.stream_prompt,), generator=g).tolist()
        engine.add_request(rid, {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=100_000,
                                                                           ignore_eos=True))
    clock = 0.0  # seconds inside step()
    token_times: dict[str, list[float]] = {rid: [] for rid in stream_ids}
    first_token: dict[str, float] = {}
    seen: dict[str, int] = {}

    def step() -> None:
        nonlocal clock
        t = time.perf_counter()
        outs = engine.step()
        clock += time.perf_counter() - t
        for out in outs:
            n = len(out.outputs[0].token_ids)
            if n > seen.get(out.request_id, 0):
                seen[out.request_id] = n
                if out.request_id in token_times:
                    token_times[out.request_id].append(clock)
                else:
                    first_token.setdefault(out.request_id, clock)

    while any(not token_times[r] for r in stream_ids):  # every stream past its prefill
        step()
    steady_from = clock  # the streams' own prefill chunks are not their steady state
    for _ in range(args.steady_steps):
        step()
    burst_at = clock
    encoded_from, records_from = len(encoded_per_step), len(read_step_log(step_log))
    prompts = [image_prompt(llm, seed * 1000 + i, args.image_size) for i in range(args.images)]
    image_ids = [f"i{seed}-{i}" for i in range(args.images)]
    t = time.perf_counter()
    for rid, p in zip(image_ids, prompts):
        engine.add_request(rid, p, SamplingParams(temperature=0, max_tokens=args.image_tokens, ignore_eos=True))
    add_s = time.perf_counter() - t
    while len(first_token) < len(image_ids):
        step()
    burst_end = clock
    encoded = encoded_per_step[encoded_from:]
    records_to = records_from + len(encoded)
    while any(engine.output_processor.requests.get(r) is not None for r in image_ids):
        step()
    engine.abort_request(stream_ids)
    while engine.has_unfinished_requests():
        engine.step()
    # the caller's own time while a step was in flight (adding the burst's requests) is not the step's
    slowest = max(read_step_log(step_log)[records_from:records_to], key=lambda r: r.duration_s - r.outside_s)

    steady, burst = [], []
    for times in token_times.values():
        for prev, cur in zip(times, times[1:]):
            if cur <= burst_at:
                if prev >= steady_from:
                    steady.append(cur - prev)
            elif cur <= burst_end or prev < burst_end:
                burst.append(cur - prev)
    ttft = [first_token[r] - burst_at for r in image_ids]
    base = statistics.median(steady)
    return {
        "steady_itl_ms": {"p50": base * 1e3, "p99": percentile(steady, 0.99) * 1e3},
        "burst_itl_ms": {"p50": statistics.median(burst) * 1e3, "p99": percentile(burst, 0.99) * 1e3,
                         "max": max(burst) * 1e3},
        "burst_p99_over_steady_p50": percentile(burst, 0.99) / base,
        "burst_seconds": burst_end - burst_at,
        "burst_steps": len(encoded),
        "burst_images_per_step": {"max": max(encoded), "mean": statistics.fmean(encoded)},
        "image_ttft_ms": {"mean": statistics.fmean(ttft) * 1e3, "p50": statistics.median(ttft) * 1e3,
                          "p99": percentile(ttft, 0.99) * 1e3},
        "image_prompt_tokens": len(engine.input_processor.process(prompts[0])[1].token_ids),
        "burst_add_request_s_excluded": add_s,
        # the burst's longest step, and what it did: its p99 inter-token latency is often this one step
        "burst_slowest_step": {**{f: getattr(slowest, f) for f in SLOWEST_FIELDS},
                               "image_tokens": slowest.work.image_tokens if slowest.work else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-bench"))
    ap.add_argument("--quick", action="store_true", help="a tiny model on the CPU, small counts")
    ap.add_argument("--budgets", default=None, help="chunked-prefill token budgets to run (default: 256,512,1024,2048;"
                                                     " quick: 16,48)")
    ap.add_argument("--encoder-budgets", default="auto,none",
                    help="encoder budgets to run with each chunked token budget: auto (the token budget, the "
                         "engine's default), none, a number of image tokens, or shared (auto, images charging the "
                         "token budget too) (default: auto,none)")
    ap.add_argument("--streams", type=int, default=None, help="running streams (default: 32; quick: 6)")
    ap.add_argument("--images", type=int, default=None, help="image requests in the burst (default: 32; quick: 6)")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--image-tokens", type=int, default=8, help="tokens each image request generates")
    ap.add_argument("--stream-prompt", type=int, default=128, help="prompt tokens of each stream")
    ap.add_argument("--steady-steps", type=int, default=None, help="decode steps before the burst (default: 32)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    q = args.quick
    args.budgets = args.budgets or ("16,48" if q else "256,512,1024,2048")
    args.streams = args.streams or (6 if q else 32)
    args.images = args.images or (6 if q else 32)
    args.steady_steps = args.steady_steps or (8 if q else 32)
    whole = 4096 if q else 16384  # without chunking: the whole burst in one step
    model_dir, _ = build_checkpoint(args.workdir, 0, 8, quick=q)
    step_log = args.workdir / "chunked_prefill.steps.jsonl"
    llm = LLM(str(model_dir), max_model_len=whole, max_num_seqs=2 * max(args.streams, args.images),
              max_num_batched_tokens=whole, enable_chunked_prefill=False, step_log=str(step_log),
              **(dict(device="cpu", num_kv_blocks=1024) if q else dict(gpu_memory_utilization=0.8)))
    encoded_per_step = count_encoded_images(llm)
    result: dict = {"model": "tiny qwen2-vl (cpu)" if q else "qwen2-vl-7b shapes, random bf16",
                    "streams": args.streams, "images": args.images, "image_size": args.image_size,
                    "stream_prompt_tokens": args.stream_prompt, "runs": []}
    encoder = {"auto": lambda b: b, "shared": lambda b: b, "none": lambda b: None}
    configs = [(False, whole, None, False)] + [
        (True, int(b), encoder[e](int(b)) if e in encoder else int(e), e == "shared")
        for b in args.budgets.split(",") for e in args.encoder_budgets.split(",")]
    for seed, (chunked, budget, encoder_budget, shared) in enumerate(configs, start=1):
        configure(llm, chunked, budget, encoder_budget, shared)
        run_burst(llm, args, seed + 100, encoded_per_step, step_log)  # first use: its token-bucket graphs captured
        row = {"chunked_prefill": chunked, "max_num_batched_tokens": budget,
               "max_num_encoder_input_tokens": encoder_budget, "encoder_in_token_budget": shared,
               **run_burst(llm, args, seed, encoded_per_step, step_log)}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    path = write_result(args.name or ("chunked_prefill_cpu_quick" if q else "chunked_prefill"), result)
    print(f"written {path}")


if __name__ == "__main__":
    main()
