"""Engine smoke test on the GPU: a Qwen2-VL-7B-shaped checkpoint with random bf16 weights, a batch with 8
adapters, decode tokens/s at batch 1 and 32, next to transformers `generate` (and transformers + peft for the
adapter row) on the same checkpoint. Correctness and an honest number; speed work is a later issue.

    python -m benchmarks.engine_smoke --workdir /tmp/smoke
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks.common import LM_LINEARS, QWEN2_VL_7B, timed_steps, write_result
from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import build_qwen2_vl, peft_target_regex, save_random_adapter


def build(workdir: Path, num_adapters: int) -> tuple[Path, list[Path]]:
    model = workdir / "qwen2-vl-7b-random"
    if not (model / "config.json").exists():
        t = time.perf_counter()
        build_qwen2_vl(model, large=True, dtype=torch.bfloat16, device="cuda", max_pixels=448 * 448, **QWEN2_VL_7B)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
    ranks = [8, 16, 32, 64]
    adapters = []
    for i in range(num_adapters):
        path = workdir / f"adapter-{i}"
        if not (path / "adapter_config.json").exists():
            save_random_adapter(model, path, r=ranks[i % len(ranks)], target_modules=peft_target_regex(LM_LINEARS),
                                seed=i, device="cuda")
        adapters.append(path)
    return model, adapters


def prompts(batch: int, prompt_len: int, vocab: int = 400) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"prompt_token_ids": torch.randint(10, vocab, (prompt_len,), generator=g).tolist()} for _ in range(batch)]


def engine_decode(llm: LLM, batch: int, loras: list, prompt_len: int, steps: int) -> dict:
    """Mean decode step time once every request is past its prefill."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for i, (p, lr) in enumerate(zip(prompts(batch, prompt_len), loras)):
        engine.add_request(f"b{batch}-{i}-{time.time()}", p, params, lr)
    engine.step()  # prefill of the whole batch
    times = timed_steps(engine)
    step = sorted(times)[len(times) // 2]
    return {"batch": batch, "ms_per_step": step * 1e3, "tokens_per_s": batch / step, "steps": len(times)}


def hf_decode(model, batch: int, prompt_len: int, steps: int, adapter_names: list[str] | None = None) -> dict:
    ids = torch.tensor([p["prompt_token_ids"] for p in prompts(batch, prompt_len)], device="cuda")
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False)
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names

    def timed(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**kw, max_new_tokens=n, min_new_tokens=n)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    timed(2)
    step = (timed(steps) - timed(1)) / (steps - 1)
    return {"batch": batch, "ms_per_step": step * 1e3, "tokens_per_s": batch / step, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-smoke"))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--hf-peft-steps", type=int, default=8)
    args = ap.parse_args()
    model_dir, adapter_dirs = build(args.workdir, 8)
    rows = {}

    t = time.perf_counter()
    llm = LLM(str(model_dir), enable_lora=True, max_loras=8, max_lora_rank=64, max_model_len=4096,
              gpu_memory_utilization=0.5, max_num_seqs=64)
    rows["valora_load_s"] = time.perf_counter() - t
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    rows["valora_lora_backend"] = llm.engine.core.lora_manager.backend
    engine_decode(llm, 4, [None] * 4, args.prompt_len, 4)  # warm-up
    rows["valora_b1"] = engine_decode(llm, 1, [None], args.prompt_len, args.steps)
    rows["valora_b32"] = engine_decode(llm, 32, [None] * 32, args.prompt_len, args.steps)
    rows["valora_b32_8_adapters"] = engine_decode(llm, 32, [loras[i % 8] for i in range(32)], args.prompt_len,
                                                  args.steps)
    print(rows, flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    rows["hf_b1"] = hf_decode(hf, 1, args.prompt_len, args.steps)
    rows["hf_b32"] = hf_decode(hf, 32, args.prompt_len, args.steps)
    peft = PeftModel.from_pretrained(hf, str(adapter_dirs[0]), adapter_name="a0")
    for i, p in enumerate(adapter_dirs[1:], start=1):
        peft.load_adapter(str(p), adapter_name=f"a{i}")
    rows["hf_peft_b32_8_adapters"] = hf_decode(peft, 32, args.prompt_len, args.hf_peft_steps,
                                               [f"a{i % 8}" for i in range(32)])
    path = write_result("engine_smoke", {"prompt_len": args.prompt_len, "rows": rows})
    print(f"\nwritten {path}")
    print(f"{'row':28s} {'ms/step':>9s} {'tok/s':>9s}")
    for k, v in rows.items():
        if isinstance(v, dict):
            print(f"{k:28s} {v['ms_per_step']:9.1f} {v['tokens_per_s']:9.1f}")


if __name__ == "__main__":
    main()
