"""Acceptance: a mixed batch (images or not, several adapters of ranks 4/8/16, base-only requests) gives the same
greedy tokens as transformers + peft `generate`, and the same per-step log-probabilities within fp32 tolerance."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image
from valora.testing.reference import HFReference

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
STEPS = 10

CONFIGS = {
    "gqa2": dict(initializer_range=0.05),
    "mha-3layers": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, initializer_range=0.05),
    "gqa4-wide": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                      vision_embed_dim=64, vision_num_heads=4, initializer_range=0.04, max_pixels=168 * 168),
    "tied": dict(tie_word_embeddings=True, num_key_value_heads=1, initializer_range=0.05),
}


def _adapters(model_dir, adapter_factory):
    return {
        # every LM linear, rank 4
        "lm4": adapter_factory(model_dir, r=4, target_modules=peft_target_regex(LM_LINEARS), seed=1),
        # vision tower + projector + a few LM layers, rank 8
        "vis8": adapter_factory(model_dir, r=8, target_modules=["qkv", "fc1", "fc2", "proj", "mlp.0", "mlp.2",
                                                                "q_proj", "down_proj"], seed=2),
        # rsLoRA, rank 16, two LM projections
        "rs16": adapter_factory(model_dir, r=16, lora_alpha=8, target_modules=peft_target_regex(["v_proj", "up_proj"]),
                                use_rslora=True, seed=3),
    }


@pytest.mark.parametrize("config", list(CONFIGS))
def test_mixed_batch_matches_transformers_peft(config, model_factory, adapter_factory):
    model_dir = model_factory(**CONFIGS[config])
    adapters = _adapters(model_dir, adapter_factory)
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    sizes = [(80, 100), (56, 56), (112, 90)]
    imgs = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    cases = [
        ("describe the scene :", [], None),
        (f"{IMG} what digit is shown ?", [imgs[0]], "lm4"),
        ("is the number odd or even ?", [], "vis8"),
        (f"{IMG} and {IMG} count objects", [imgs[1], imgs[2]], "vis8"),
        (f"{IMG} caption :", [imgs[2]], "rs16"),
        ("hello world", [], "rs16"),
        (f"{IMG}", [imgs[0]], None),
        ("a dog runs", [], "lm4"),
    ]
    llm = LLM(str(model_dir), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32", device="cpu")
    prompts = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im, _ in cases]
    loras = [LoRARequest(a, ids[a], str(adapters[a])) if a else None for _, _, a in cases]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params, loras, use_tqdm=False)

    ref = HFReference(str(model_dir))
    for (p, _im, a), prompt, out in zip(cases, prompts, outs):
        processed = llm.engine.process_prompt(prompt)[1]
        expected = ref.generate(processed, str(adapters[a]) if a else None, STEPS)
        got = out.outputs[0]
        assert got.token_ids == expected.token_ids, f"{config}: {p!r} with adapter {a}"
        for step, (lp, ref_lp) in enumerate(zip(got.logprobs, expected.logprobs)):
            for token, value in lp.items():
                assert value == pytest.approx(ref_lp[token].item(), abs=2e-4), f"{config} {p!r} step {step}"
        # the last step's whole distribution, not only the top tokens
        assert torch.topk(expected.logprobs[-1], 3).indices.tolist() == list(got.logprobs[-1])[:3]
