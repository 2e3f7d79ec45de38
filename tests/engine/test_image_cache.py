"""A repeated image is encoded once: embeddings are cached by content, per adapter when the adapter changes them."""

from __future__ import annotations

import pytest

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
pytestmark = pytest.mark.families("qwen2_vl")


def test_repeated_frames_hit_the_cache_and_answers_do_not_change(tiny_model, adapter_factory):
    lm_only = LoRARequest("lm", 1, str(adapter_factory(tiny_model, r=4, target_modules=peft_target_regex(["q_proj"]))))
    vision = LoRARequest("vis", 2, str(adapter_factory(tiny_model, r=4, target_modules=["qkv", "fc1"], seed=5)))
    frames = [random_image(56, 84, seed=s) for s in (1, 2)]
    prompts = [{"prompt": f"{IMG} frame {i}", "multi_modal_data": {"image": frames[i % 2]}} for i in range(6)]
    loras = [None, lm_only, vision, vision, None, lm_only]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def run(cache_mb: int):
        llm = LLM(str(tiny_model), enable_lora=True, max_lora_rank=8, dtype="float32", device="cpu",
                  embed_cache_mb=cache_mb)
        outs = []
        for p, lora in zip(prompts, loras):  # one at a time, so later requests can reuse earlier embeddings
            outs.append(llm.generate(p, params, lora, use_tqdm=False)[0].outputs[0].token_ids)
        return outs, llm.engine.core.stats()

    cached, stats = run(512)
    uncached, _ = run(0)
    assert cached == uncached
    # misses: frame 0 base, frame 1 under the LM-only adapter (the base embedding), frame 0 and frame 1 under the
    # vision adapter (its own embeddings); hits: frame 0 base again, frame 1 under the LM-only adapter again
    assert (stats.image_cache_hits, stats.image_cache_misses) == (2, 4)
