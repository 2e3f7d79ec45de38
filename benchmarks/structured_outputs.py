"""What structured outputs cost: decode throughput at batch 32 with every request free, half of them constrained by
a JSON schema (a list of detections: label, box, caption), and all of them constrained, on a Qwen2-VL-7B-shaped
random checkpoint with a byte-level BPE tokenizer of --tokenizer-vocab tokens (the grammar's mask work grows with the
vocabulary; no hub tokenizer is reachable, so one is trained on the Python sources at hand). Target: the mixed batch
within 10% of the free one.

The loop is timed as a whole (no synchronisation between steps), so the host's mask work overlaps the device's step
as it does in serving.

    python -m benchmarks.structured_outputs --workdir /tmp/valora-so          # GPU; results JSON in benchmarks/results
    python -m benchmarks.structured_outputs --quick                           # CPU check: tiny model, small batch
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch

from benchmarks.common import QWEN2_VL_7B, write_result
from valora import LLM, SamplingParams
from valora.sampling_params import StructuredOutputsParams
from valora.testing.checkpoints import build_model

DETECTIONS = {  # never complete within the measured steps (minItems), so every constrained row runs throughout
    "type": "array",
    "minItems": 1000,
    "items": {
        "type": "object",
        "properties": {
            "label": {"enum": ["car", "person", "bicycle", "traffic light", "dog"]},
            "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "minItems": 4, "maxItems": 4},
            "score": {"type": "number"},
            "caption": {"type": "string", "maxLength": 40},
        },
        "required": ["label", "box", "score", "caption"],
        "additionalProperties": False,
    },
}


def corpus(limit_bytes: int):
    """Python's own sources: code, prose and JSON-ish punctuation, enough text for a large BPE vocabulary."""
    total = 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(errors="ignore")
        total += len(text)
        yield text
        if total > limit_bytes:
            return


def build(workdir: Path, quick: bool, vocab: int) -> Path:
    model = workdir / (f"tiny-{vocab}" if quick else f"qwen2-vl-7b-random-{vocab}")
    if not (model / "config.json").exists():
        t = time.perf_counter()
        text = corpus(vocab * 1000)
        if quick:
            build_model("qwen2_vl", model, initializer_range=0.05, tokenizer_vocab=vocab, corpus=text)
        else:
            build_model("qwen2_vl", model, large=True, dtype=torch.bfloat16, device="cuda", max_pixels=448 * 448,
                        tokenizer_vocab=vocab, corpus=text, **QWEN2_VL_7B)
        print(f"checkpoint and a tokenizer of {vocab} tokens written in {time.perf_counter() - t:.0f} s", flush=True)
    return model


def decode(llm: LLM, batch: int, constrained: int, steps: int, prompt_len: int) -> dict:
    """Tokens per second of `steps` decode steps of `batch` requests, `constrained` of them under the schema."""
    engine = llm.engine
    g = torch.Generator().manual_seed(0)
    spec = StructuredOutputsParams(json=DETECTIONS, disable_any_whitespace=True)
    t0 = time.time()
    for i in range(batch):
        ids = torch.randint(10, 400, (prompt_len,), generator=g).tolist()
        params = SamplingParams(temperature=1.0, seed=i, max_tokens=steps + 1, ignore_eos=True,
                                structured_outputs=spec if i < constrained else None)
        engine.add_request(f"so-{constrained}-{i}-{t0}", {"prompt_token_ids": ids}, params)
    counts: dict[str, int] = {}  # request id -> its tokens so far
    finished: set[str] = set()

    def step() -> None:
        for o in engine.step():
            counts[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished:
                finished.add(o.request_id)

    # The prefill (compiling the grammar on first use), over as many steps as the token budget needs (a batch of
    # 32 prompts of 128 tokens is two steps at the default 2,048): timed are the steps once every request decodes.
    while len(counts) < batch:
        step()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    before, t = sum(counts.values()), time.perf_counter()
    n = 0
    while engine.has_unfinished_requests():
        step()
        n += 1
    sync()
    elapsed = time.perf_counter() - t
    assert len(finished) == batch and set(counts.values()) == {steps + 1}, f"requests ended early: {counts}"
    decoded = sum(counts.values()) - before
    return {"batch": batch, "constrained": constrained, "steps": n, "ms_per_step": elapsed / n * 1e3,
            "tokens_per_s": decoded / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-structured-outputs"))
    ap.add_argument("--quick", action="store_true", help="CPU check: tiny model, batch 8, 12 steps")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 (8 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed (default: 128, 12 with --quick)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokenizer-vocab", type=int, default=None, help="default: 65536 (2048 with --quick)")
    args = ap.parse_args()
    quick = args.quick
    batch = args.batch or (8 if quick else 32)
    steps = args.steps or (12 if quick else 128)
    vocab = args.tokenizer_vocab or (2048 if quick else 65536)
    model = build(args.workdir, quick, vocab)
    if quick:
        torch.set_num_threads(1)  # a tiny model: one thread beats a pool contended by neighbours
        llm = LLM(str(model), dtype="float32", device="cpu", max_num_seqs=batch)
    else:
        llm = LLM(str(model), max_model_len=4096, gpu_memory_utilization=0.5, max_num_seqs=64)
    decode(llm, batch, batch, 2, args.prompt_len)  # warm-up: graphs, allocator, the grammar's compilation
    rows = {}
    for name, constrained in (("free", 0), ("mixed", batch // 2), ("constrained", batch)):
        rows[name] = decode(llm, batch, constrained, steps, args.prompt_len)
        print(name, rows[name], flush=True)
    rows["mixed_cost"] = 1 - rows["mixed"]["tokens_per_s"] / rows["free"]["tokens_per_s"]
    rows["constrained_cost"] = 1 - rows["constrained"]["tokens_per_s"] / rows["free"]["tokens_per_s"]
    name = "structured_outputs_cpu_quick" if quick else "structured_outputs_h100"
    path = write_result(name, {"tokenizer_vocab": vocab, "prompt_len": args.prompt_len, "schema": DETECTIONS,
                               "target": "mixed_cost <= 0.10", "rows": rows})
    print(f"mixed batch costs {rows['mixed_cost']:.1%}, all constrained {rows['constrained_cost']:.1%}; "
          f"written {path}")


if __name__ == "__main__":
    main()
