"""A repeated image is encoded once: embeddings are cached by content, per adapter when the adapter changes them."""

from __future__ import annotations

import pytest

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image

IMG = "<|vision_start|><|image_pad|><|vision_end|>"
pytestmark = pytest.mark.families("qwen2_vl")


PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def frame_requests(tiny_model, adapter_factory) -> tuple[list[dict], list[LoRARequest | None]]:
    """Two frames, each sent three times: with no adapter, an LM-only adapter (the base embedding) and one that
    adapts the vision tower (its own embedding)."""
    lm_only = LoRARequest("lm", 1, str(adapter_factory(tiny_model, r=4, target_modules=peft_target_regex(["q_proj"]))))
    vision = LoRARequest("vis", 2, str(adapter_factory(tiny_model, r=4, target_modules=["qkv", "fc1"], seed=5)))
    frames = [random_image(56, 84, seed=s) for s in (1, 2)]
    prompts = [{"prompt": f"{IMG} frame {i}", "multi_modal_data": {"image": frames[i % 2]}} for i in range(6)]
    return prompts, [None, lm_only, vision, vision, None, lm_only]


def tiny_llm(tiny_model, cache_mb: int) -> LLM:
    return LLM(str(tiny_model), enable_lora=True, max_lora_rank=8, dtype="float32", device="cpu",
               embed_cache_mb=cache_mb)


def one_at_a_time(llm: LLM, prompts, loras) -> list[list[int]]:
    """So that later requests can reuse earlier embeddings."""
    return [llm.generate(p, PARAMS, lora, use_tqdm=False)[0].outputs[0].token_ids for p, lora in zip(prompts, loras)]


def test_repeated_frames_hit_the_cache_and_answers_do_not_change(tiny_model, adapter_factory):
    prompts, loras = frame_requests(tiny_model, adapter_factory)
    llm = tiny_llm(tiny_model, 512)
    cached = one_at_a_time(llm, prompts, loras)
    assert cached == one_at_a_time(tiny_llm(tiny_model, 0), prompts, loras)
    stats = llm.engine.core.stats()
    # misses: frame 0 base, frame 1 under the LM-only adapter (the base embedding), frame 0 and frame 1 under the
    # vision adapter (its own embeddings); hits: frame 0 base again, frame 1 under the LM-only adapter again
    assert (stats.image_cache_hits, stats.image_cache_misses) == (2, 4)


def test_one_step_encodes_each_distinct_image_once(tiny_model, adapter_factory, monkeypatch):
    """The six requests in one step, no cache: the vision pass takes the four distinct (frame, embedding) pairs
    once each, and the answers are those of the requests run one by one."""
    prompts, loras = frame_requests(tiny_model, adapter_factory)
    llm = tiny_llm(tiny_model, 0)
    model = llm.engine.core.runner.model
    encoded, embed_images = [], model.embed_images

    def counted(data, *args, **kwargs):
        encoded.append(len(data))
        return embed_images(data, *args, **kwargs)

    monkeypatch.setattr(model, "embed_images", counted)
    together = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, loras, use_tqdm=False)]
    assert encoded == [4]
    assert together == one_at_a_time(tiny_llm(tiny_model, 0), prompts, loras)


def test_a_sequence_drops_its_image_embeddings_once_its_prompt_is_computed(tiny_model):
    """They are kept only while a later chunk still takes some of their rows, not for the whole decode."""
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", embed_cache_mb=0, max_num_seqs=2,
              max_num_batched_tokens=4)
    engine = llm.engine
    engine.add_request("r", {"prompt": f"{IMG} describe it", "multi_modal_data": {"image": random_image(84, 112)}},
                       SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    (seq,) = engine.core.scheduler.waiting
    item = seq.prompt.images[0]
    assert item.num_tokens > 4  # so the image's rows span several chunks
    kept = []
    while seq.num_computed < len(seq.prompt.token_ids):
        engine.step()
        inside = item.offset < seq.num_computed < item.offset + item.num_tokens
        kept.append((inside, seq.image_embeds[0] is not None))
    assert (True, True) in kept and all(inside == held for inside, held in kept)
    engine.step()
    assert seq.image_embeds == [None]
