"""Per-request sampling: seeds reproduce, stop strings and stop tokens end a completion, n completions, limits."""

from __future__ import annotations

import pytest

from valora import LLM, SamplingParams
from valora.testing.families import FAMILIES

pytestmark = pytest.mark.families("qwen2_vl")  # sampling is the same for every family; chat templates are not


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device="cpu", seed=0)


def _tokens(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs


def test_seeded_sampling_reproduces_and_differs_by_seed(llm):
    a = _tokens(llm, "a dog runs", temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)[0].token_ids
    b = _tokens(llm, "a dog runs", temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)[0].token_ids
    c = _tokens(llm, "a dog runs", temperature=1.0, seed=2, max_tokens=16, ignore_eos=True)[0].token_ids
    assert a == b and a != c


def test_seed_is_independent_of_batch_company(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    alone = llm.generate("the quick brown fox", params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate(["hello", "the quick brown fox", "world"],
                         [SamplingParams(temperature=1.0, max_tokens=12), params, SamplingParams(temperature=0)],
                         use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone


def test_top_k_one_is_greedy(llm):
    greedy = _tokens(llm, "hello world", temperature=0, max_tokens=10, ignore_eos=True)[0].token_ids
    topk1 = _tokens(llm, "hello world", temperature=1.3, top_k=1, seed=3, max_tokens=10, ignore_eos=True)[0]
    assert topk1.token_ids == greedy


def test_n_completions(llm):
    outs = _tokens(llm, "caption :", n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_stop_string_truncates_text(llm):
    full = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True)[0]
    stop = full.text[4:7]
    assert stop.strip(), full.text
    out = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]
    kept = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                   include_stop_str_in_output=True)[0]
    assert kept.text == full.text[: full.text.find(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids
    target = full[3]
    first = full.index(target)
    out = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[target])[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop" and out.stop_reason == target
    held = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[target],
                   min_tokens=first + 2)[0]
    assert len(held.token_ids) >= first + 2 and held.token_ids[first] != target


def test_eos_stops_unless_ignored(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu")
    full = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids
    llm.engine.eos_token_ids = {full[2]}  # a random model never says EOS by itself: declare one it will say
    out = _tokens(llm, "a red car", temperature=0, max_tokens=12)[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == full[: full.index(full[2]) + 1]
    assert _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids == full


def test_max_model_len_caps_generation(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", max_model_len=24)
    out = llm.generate("a dog runs across green grass", SamplingParams(temperature=0, max_tokens=100,
                       ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 24


@pytest.mark.families(*FAMILIES)
def test_chat_applies_template_with_images(llm, family):
    """The family's own template (LLaVA's ships beside the processor, in chat_template.json)."""
    from valora.testing.images import random_image

    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(56, 56)},
                                              {"type": "text", "text": "what digit is shown ?"}]}]
    prompt = llm.chat_prompt(messages)
    assert prompt["prompt"].count(family.image_token) == 1 and "what digit is shown ?" in prompt["prompt"]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    direct = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids
