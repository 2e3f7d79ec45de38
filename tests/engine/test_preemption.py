"""Acceptance: with a KV cache too small for the batch, every request still completes with the same output as
without pressure (preemption by recompute; seeded sampling included, since recompute never resamples)."""

from __future__ import annotations

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.images import random_image


def test_outputs_survive_preemption(family, tiny_model, adapter_factory):
    adapter = adapter_factory(tiny_model, r=8, target_modules=family.targets("lm", ("q_proj", "v_proj", "down_proj")))
    lora = LoRARequest("ad", 1, str(adapter))
    prompts, loras, params = [], [], []
    for i in range(10):
        text = "describe the scene : a red car parks near a tall building " * (1 + i % 3)
        image = {"image": random_image(56, 56, seed=i)}
        prompts.append({"prompt": f"{family.image_prompt} {text}", "multi_modal_data": image} if i % 2 else text)
        loras.append(lora if i % 3 else None)
        params.append(SamplingParams(temperature=0.8 if i % 4 == 0 else 0, seed=i, top_k=50, top_p=0.9,
                                     max_tokens=40, ignore_eos=True))

    def run(num_kv_blocks):
        llm = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
                  block_size=8, num_kv_blocks=num_kv_blocks)
        outs = llm.generate(prompts, params, loras, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine

    roomy, _ = run(None)
    tight, engine = run(24)  # 192 token slots for ten requests of ~30-60 prompt tokens plus 40 new ones each
    assert engine.core.stats().num_preemptions > 0
    assert tight == roomy
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks  # every block came back
