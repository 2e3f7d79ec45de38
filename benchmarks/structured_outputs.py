"""What structured outputs cost: decode throughput at batch 32 with every request free, half of them constrained by
a JSON schema (a list of detections: label, box, caption), and all of them constrained, on a Qwen2-VL-7B-shaped
random checkpoint with a byte-level BPE tokenizer of --tokenizer-vocab tokens (the grammar's mask work grows with the
vocabulary; no hub tokenizer is reachable, so one is trained on the Python sources at hand). Target: the mixed batch
within 10% of the free one.

The loop is timed as a whole (no synchronisation between steps), so the host's mask work overlaps the device's step
as it does in serving.

    python -m benchmarks.structured_outputs --workdir /tmp/valora-bench       # GPU; results JSON in benchmarks/results
    python -m benchmarks.structured_outputs --quick                           # CPU check: tiny model, small batch
"""

from __future__ import annotations

import argparse
import json
import sysconfig
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.common import build_checkpoint, write_result
from valora import LLM, SamplingParams
from valora.sampling_params import StructuredOutputsParams
from valora.testing.checkpoints import build_tokenizer

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


def build(workdir: Path, quick: bool, vocab: int) -> tuple[Path, Path]:
    """The benchmarks' shared checkpoint (`build_checkpoint`: one 16 GB build serves every GPU benchmark given the
    same --workdir) and a tokenizer of `vocab` tokens beside it. Both tokenizers put the family's special tokens
    first, so the checkpoint's image, end and padding ids hold for either."""
    model, _ = build_checkpoint(workdir, 0, 8, quick=quick)
    tokenizer = workdir / f"tokenizer-{vocab}"
    if not (tokenizer / "tokenizer.json").exists():
        t = time.perf_counter()
        tok = build_tokenizer("qwen2_vl", tokenizer, vocab_size=vocab, corpus=corpus(vocab * 1000))
        print(f"a tokenizer of {len(tok)} tokens trained in {time.perf_counter() - t:.0f} s", flush=True)
    size = json.loads((model / "config.json").read_text())
    size = size.get("vocab_size") or size["text_config"]["vocab_size"]
    if len(AutoTokenizer.from_pretrained(tokenizer)) > size:
        raise SystemExit(f"--tokenizer-vocab {vocab} is over the checkpoint's {size} embeddings")
    return model, tokenizer


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
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-bench"),
                    help="where the checkpoint and tokenizer are built on first use (shared with the other benchmarks)")
    ap.add_argument("--quick", action="store_true", help="CPU check: tiny model, batch 8, 12 steps")
    ap.add_argument("--batch", type=int, default=None, help="default: 32 (8 with --quick)")
    ap.add_argument("--steps", type=int, default=None, help="decode steps timed (default: 128, 12 with --quick)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tokenizer-vocab", type=int, default=None, help="default: 65536 (512 with --quick)")
    args = ap.parse_args()
    quick = args.quick
    batch = args.batch or (8 if quick else 32)
    steps = args.steps or (12 if quick else 128)
    vocab = args.tokenizer_vocab or (512 if quick else 65536)
    model, tokenizer = build(args.workdir, quick, vocab)
    if quick:
        torch.set_num_threads(1)  # a tiny model: one thread beats a pool contended by neighbours
        llm = LLM(str(model), tokenizer=str(tokenizer), dtype="float32", device="cpu", max_num_seqs=batch)
    else:
        llm = LLM(str(model), tokenizer=str(tokenizer), max_model_len=4096, gpu_memory_utilization=0.5,
                  max_num_seqs=64)
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
