"""Acceptance: a mixed batch (images or not, several per prompt, adapters of ranks 4/8/16 on the vision tower, the
projector and the LM, rsLoRA, base-only requests) gives the same greedy tokens as transformers + peft `generate`,
and the same per-step log-probabilities within fp32 tolerance, for every family over several configurations."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.families import FAMILIES
from valora.testing.images import random_image
from valora.testing.reference import HFReference

STEPS = 10

# Per family: GQA ratios (MHA to 4:1), widths, tied embeddings, and each family's own vision variants.
CONFIGS = {
    "qwen2_vl": {
        "gqa2": dict(initializer_range=0.05),
        "mha-3layers": dict(num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=3, initializer_range=0.05),
        "gqa4-wide": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                          vision_embed_dim=64, vision_num_heads=4, initializer_range=0.04, max_pixels=168 * 168),
        "tied": dict(tie_word_embeddings=True, num_key_value_heads=1, initializer_range=0.05),
    },
    "qwen2_5_vl": {
        "gqa2-windows": dict(initializer_range=0.05),
        "mha-fullatt-first": dict(num_key_value_heads=4, vision_depth=3, fullatt_block_indexes=(0,),
                                  initializer_range=0.05, tie_word_embeddings=True),
        "gqa4-wide": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8, num_key_value_heads=2,
                          vision_embed_dim=64, vision_num_heads=4, window_size=112, initializer_range=0.04,
                          max_pixels=168 * 168),
    },
    "llava": {
        "gqa2-layer-2": dict(initializer_range=0.05),
        "mha-full-last-layer": dict(num_key_value_heads=4, vision_feature_select_strategy="full",
                                    vision_feature_layer=-1, image_size=48, initializer_range=0.05),
        "gqa4-mistral-two-layers": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                        num_key_value_heads=2, vision_embed_dim=64, vision_num_heads=4,
                                        vision_depth=3, vision_feature_layer=[-3, -1], text_model_type="mistral",
                                        tie_word_embeddings=True, initializer_range=0.04),
    },
    "internvl": {
        "gqa2-tiles": dict(initializer_range=0.05),
        "mha-qknorm-rmsnorm": dict(num_key_value_heads=4, use_qk_norm=True, norm_type="rms_norm",
                                   vision_feature_layer=-2, attention_bias=False, initializer_range=0.05),
        "gqa4-wide-final-norm": dict(hidden_size=128, intermediate_size=256, num_attention_heads=8,
                                     num_key_value_heads=2, vision_embed_dim=64, vision_num_heads=4,
                                     use_mean_pooling=False, max_patches=12, tie_word_embeddings=True,
                                     initializer_range=0.04),
    },
}
CASES = [(f, c) for f in FAMILIES for c in CONFIGS[f]]


def _adapters(spec, model_dir, adapter_factory):
    lm = spec.targets("lm")
    return {
        # the whole vision tower (patch embedding included) and every LM linear, rank 4
        "vis4": adapter_factory(model_dir, r=4, target_modules=f"{spec.targets('vision')}|{lm}", seed=1),
        # the projector and two LM projections, rank 8
        "proj8": adapter_factory(model_dir, r=8, target_modules=f"{spec.targets('projector')}|"
                                 f"{spec.targets('lm', ('q_proj', 'down_proj'))}", seed=2),
        # rsLoRA, rank 16, two LM projections
        "rs16": adapter_factory(model_dir, r=16, lora_alpha=8, target_modules=spec.targets("lm", ("v_proj", "up_proj")),
                                use_rslora=True, seed=3),
    }


@pytest.mark.parametrize(("family_name", "config"), CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_mixed_batch_matches_transformers_peft(family_name, config, model_factory, adapter_factory):
    spec = FAMILIES[family_name]
    model_dir = model_factory(family_name, **CONFIGS[family_name][config])
    adapters = _adapters(spec, model_dir, adapter_factory)
    ids = {name: i + 1 for i, name in enumerate(adapters)}
    img = spec.image_prompt
    sizes = [(80, 100), (56, 56), (112, 90)]
    imgs = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    cases = [
        ("describe the scene :", [], None),
        (f"{img} what digit is shown ?", [imgs[0]], "vis4"),
        ("is the number odd or even ?", [], "proj8"),
        (f"{img} and {img} count objects", [imgs[1], imgs[2]], "vis4"),
        (f"{img} caption :", [imgs[2]], "rs16"),
        ("hello world", [], "rs16"),
        (f"{img}", [imgs[0]], None),
        (f"a dog {img} runs {img} fast", [imgs[2], imgs[1]], "proj8"),
    ]
    llm = LLM(str(model_dir), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32", device="cpu")
    prompts = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im, _ in cases]
    loras = [LoRARequest(a, ids[a], str(adapters[a])) if a else None for _, _, a in cases]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True, logprobs=3)
    outs = llm.generate(prompts, params, loras, use_tqdm=False)

    ref = HFReference(str(model_dir))
    for (p, _im, a), prompt, out in zip(cases, prompts, outs):
        processed = llm.engine.input_processor.process(prompt)[1]
        expected = ref.generate(processed, str(adapters[a]) if a else None, STEPS)
        got = out.outputs[0]
        assert got.token_ids == expected.token_ids, f"{config}: {p!r} with adapter {a}"
        for step, (lp, ref_lp) in enumerate(zip(got.logprobs, expected.logprobs)):
            for token, value in lp.items():
                assert value == pytest.approx(ref_lp[token].item(), abs=2e-4), f"{config} {p!r} step {step}"
        # the last step's whole distribution, not only the top tokens
        assert torch.topk(expected.logprobs[-1], 3).indices.tolist() == list(got.logprobs[-1])[:3]
