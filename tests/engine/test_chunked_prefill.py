"""Acceptance (issue 16, 3): prompts split across steps give the same tokens as whole prompts, for every family, with
adapters on the LM and on the vision tower, with images split by chunk boundaries, under preemption; each image is
embedded once however many chunks take its rows."""

from __future__ import annotations

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.images import random_image

BUDGET = 5  # tokens per step: 3 running decodes leave 2 for a prompt, so every image is cut into pieces
MAX_SEQS = 3


def _requests(family, model_dir, adapter_factory):
    vis = adapter_factory(model_dir, r=4, target_modules=f"{family.targets('vision')}|{family.targets('lm')}", seed=1)
    lm = adapter_factory(model_dir, r=8, target_modules=family.targets("lm", ("q_proj", "v_proj", "down_proj")),
                         seed=2)
    loras = {"vis": LoRARequest("vis", 1, str(vis)), "lm": LoRARequest("lm", 2, str(lm)), None: None}
    img, sys = family.image_prompt, "you are a careful assistant ; answer briefly . "
    imgs = [random_image(80, 100, seed=1), random_image(56, 56, seed=2), random_image(112, 90, seed=3)]
    cases = [
        (f"{sys}{img} what is shown ?", [imgs[0]], "vis"),
        (f"{sys}describe a busy street .", [], "lm"),
        (f"{img} and {img} count the objects", [imgs[1], imgs[2]], None),
        (f"{sys}{img} caption :", [imgs[2]], "lm"),
        ("hello", [], None),
        (f"a dog {img} runs", [imgs[0]], "vis"),
    ]
    prompts = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im, _ in cases]
    params = [SamplingParams(temperature=0.8, seed=i, top_k=20, max_tokens=6, ignore_eos=True) if i == 3 else
              SamplingParams(temperature=0, max_tokens=6, ignore_eos=True) for i in range(len(cases))]
    return prompts, params, [loras[a] for _, _, a in cases], sum(len(im) for _, im, _ in cases)


def _run(model_dir, prompts, params, loras, **options):
    """Token ids of every request and how many images the vision tower embedded."""
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
              max_num_seqs=MAX_SEQS, enable_prefix_caching=False, embed_cache_mb=0, **options)
    model = llm.engine.core.model
    embedded = []
    embed = model.embed_images

    def counting(data, slots, merged):
        embedded.append(len(data))
        return embed(data, slots, merged)

    model.embed_images = counting
    outs = llm.generate(prompts, params, loras, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], sum(embedded), llm.engine


def test_chunks_give_the_same_tokens_and_embed_each_image_once(family, tiny_model, adapter_factory):
    prompts, params, loras, num_images = _requests(family, tiny_model, adapter_factory)
    whole, whole_embedded, _ = _run(tiny_model, prompts, params, loras, enable_chunked_prefill=False)
    chunked, chunked_embedded, engine = _run(tiny_model, prompts, params, loras, max_num_batched_tokens=BUDGET)
    assert engine.core.max_batched_tokens == BUDGET
    largest = max(item.num_tokens for p in prompts for item in engine.input_processor.process(p)[1].images)
    assert largest > BUDGET  # so some image's rows are split across steps
    assert chunked == whole
    assert chunked_embedded == whole_embedded == num_images


def test_chunks_survive_preemption(family, tiny_model, adapter_factory):
    prompts, params, loras, _ = _requests(family, tiny_model, adapter_factory)
    whole, _, engine = _run(tiny_model, prompts, params, loras, enable_chunked_prefill=False)
    longest = max(len(engine.input_processor.process(p)[1].token_ids) for p in prompts) + 6
    tight, _, engine = _run(tiny_model, prompts, params, loras, max_num_batched_tokens=BUDGET + 3, block_size=4,
                            num_kv_blocks=-(-longest // 4) + 2)  # room for the longest, not for three at once
    assert engine.core.stats().num_preemptions > 0
    assert tight == whole
    assert engine.core.blocks.num_free == engine.core.blocks.num_blocks
