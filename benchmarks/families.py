"""The paper's LMM families at 7B-class shapes on the GPU (issue 10): random bf16 weights saved in the HF format, a
batch of 8 image requests over 8 adapters (on the LM, the vision tower and the projector), image prefill time and
decode tokens/s, next to transformers on the same checkpoint and the same preprocessed inputs.

    python -m benchmarks.families --workdir /tmp/families [--families llava internvl qwen2_5_vl]

One checkpoint (~16 GB) exists at a time; each family's JSON is written as soon as it is measured.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import time
from pathlib import Path

import torch
import transformers

from benchmarks.common import write_result
from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import build_model, save_random_adapter
from valora.testing.families import FAMILIES, TinyFamily
from valora.testing.images import random_image

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_VISION_7B = dict(vision_depth=24, vision_embed_dim=1024, vision_num_heads=16, vision_intermediate_size=4096)
_QWEN25_LM = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)

SHAPES = {
    # LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (second-to-last layer, 576 tokens), Llama-2-7B.
    "llava": dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, image_size=336,
                  patch_size=14, vision_feature_layer=-2, **_VISION_7B),
    # InternVL3-8B: InternViT-300M at 448 px tiles (256 tokens each), Qwen2.5-7B.
    "internvl": dict(image_size=448, patch_size=14, max_patches=12, **_VISION_7B, **_QWEN25_LM),
    # Qwen2.5-VL-7B: 32-block windowed ViT of width 1280, Qwen2.5-7B.
    "qwen2_5_vl": dict(vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vision_intermediate_size=3420,
                       window_size=112, fullatt_block_indexes=(7, 15, 23, 31), max_pixels=448 * 448, **_QWEN25_LM),
}


def build(family: TinyFamily, workdir: Path, shapes: dict, dtype: torch.dtype) -> tuple[Path, list[Path]]:
    model = workdir / f"{family.name}-random"
    t = time.perf_counter()
    build_model(family, model, large=True, dtype=dtype, device=DEVICE, **shapes)
    print(f"{family.name}: checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
    lm = family.targets("lm")
    targets = [lm, lm, f"{family.targets('vision')}|{lm}", f"{family.targets('projector')}|{lm}"]
    adapters = []
    for i in range(8):
        path = workdir / f"{family.name}-adapter-{i}"
        save_random_adapter(model, path, r=[8, 16, 32, 64][i % 4], target_modules=targets[i % 4], seed=i,
                            use_rslora=i == 5, dtype=dtype, device=DEVICE)
        adapters.append(path)
    return model, adapters


def requests(family: TinyFamily, n: int) -> list[dict]:
    text = "describe the scene : a red car parks near a tall building while people walk on the street ."
    return [{"prompt": f"{family.image_prompt} {text}", "multi_modal_data": {"image": random_image(448, 448, i)}}
            for i in range(n)]


def timed(fn) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def valora_run(llm: LLM, prompts: list[dict], loras: list, steps: int) -> dict:
    """Seconds of the step that prefills every prompt (vision tower included), then the median decode step."""
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    for i, (p, lr) in enumerate(zip(prompts, loras)):
        engine.add_request(f"r{i}-{time.time()}", p, params, lr)
    prefill = timed(engine.step)
    times = []
    while engine.has_unfinished_requests():
        times.append(timed(engine.step))
    step = sorted(times)[len(times) // 2]
    return {"batch": len(prompts), "prefill_s": prefill, "ms_per_step": step * 1e3,
            "tokens_per_s": len(prompts) / step}


def hf_run(model, inputs: dict, steps: int) -> dict:
    def generate(n: int):
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def prefill():
        with torch.no_grad():
            model(**inputs)

    prefill()  # warm-up
    generate(2)
    prefill_s = timed(prefill)
    step = (timed(lambda: generate(steps)) - timed(lambda: generate(1))) / (steps - 1)
    batch = inputs["input_ids"].shape[0]
    return {"batch": batch, "prefill_s": prefill_s, "ms_per_step": step * 1e3, "tokens_per_s": batch / step}


def bench(family: TinyFamily, workdir: Path, steps: int, batch: int, shapes: dict) -> dict:
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model_dir, adapter_dirs = build(family, workdir, shapes, dtype)
    rows: dict = {}
    t = time.perf_counter()
    llm = LLM(str(model_dir), enable_lora=True, max_loras=8, max_lora_rank=64, max_model_len=4096,
              max_num_batched_tokens=16384, gpu_memory_utilization=0.6, max_num_seqs=64, device=DEVICE)
    rows["valora_load_s"] = time.perf_counter() - t
    rows["valora_lora_backend"] = llm.engine.core.lora_manager.backend
    loras = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    prompts = requests(family, batch)
    processed = [llm.engine.input_processor.process(p)[1] for p in prompts]
    rows["prompt_tokens"] = len(processed[0].token_ids)
    rows["image_tokens"] = processed[0].images[0].num_tokens
    valora_run(llm, prompts, loras, 4)  # warm-up, adapters into their slots
    rows["valora_8_adapters"] = valora_run(llm, prompts, loras, steps)
    rows["valora_no_adapter"] = valora_run(llm, prompts, [None] * batch, steps)
    stats = llm.engine.core.stats()  # the orchestrator's mode decisions over all three runs
    rows["valora_modes"] = {"steps": stats.mode_steps, "switches": stats.num_switches}
    print(family.name, rows, flush=True)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    from transformers import AutoModelForImageTextToText

    from valora.testing.reference import hf_inputs

    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(DEVICE).eval()
    per_prompt = [hf_inputs(hf, p, DEVICE) for p in processed]
    inputs = {k: torch.cat([x[k] for x in per_prompt]) for k in per_prompt[0]}
    rows["hf_no_adapter"] = hf_run(hf, inputs, steps)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    shutil.rmtree(model_dir)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-families"))
    ap.add_argument("--families", nargs="+", default=list(SHAPES))
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="the families' tiny test shapes: checks the script on a CPU")
    args = ap.parse_args()
    table = []
    for name in args.families:
        shapes = {} if args.tiny else SHAPES[name]
        rows = bench(FAMILIES[name], args.workdir, args.steps, args.batch, shapes)
        path = write_result(f"families_{name}{'_tiny' if args.tiny else ''}",
                            {"family": name, "transformers": transformers.__version__, "shapes": shapes, "rows": rows})
        print(f"written {path}", flush=True)
        table.append((name, rows))
    print(f"\n{'family':11s} {'run':18s} {'prefill s':>9s} {'ms/step':>8s} {'tok/s':>7s}")
    for name, rows in table:
        for run in ("valora_8_adapters", "valora_no_adapter", "hf_no_adapter"):
            r = rows[run]
            print(f"{name:11s} {run:18s} {r['prefill_s']:9.3f} {r['ms_per_step']:8.1f} {r['tokens_per_s']:7.1f}")


if __name__ == "__main__":
    main()
