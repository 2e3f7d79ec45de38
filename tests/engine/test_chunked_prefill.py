"""Acceptance (issue 16, 3): prompts split across steps give the same tokens as whole prompts, for every family, with
adapters on the LM and on the vision tower, with images split by chunk boundaries, under preemption; each image is
embedded once however many chunks take its rows. The encoder budget: a step encodes no more image tokens than it
allows beyond its first image, an image over it is still scheduled, and outputs are the same."""

from __future__ import annotations

import argparse

import pytest
import torch

from valora import LLM, LoRARequest, SamplingParams
from valora.config import SchedulerConfig
from valora.engine.block_manager import BlockManager
from valora.engine.scheduler import Scheduler
from valora.engine.sequence import Sequence
from valora.multimodal.cache import EmbeddingCache
from valora.multimodal.inputs import ImageItem, ProcessedPrompt
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
    llm.engine.passes = embedded  # images per vision pass
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


def test_encoder_budget_gives_the_same_tokens(family, tiny_model, adapter_factory):
    """A budget under every image (each step encodes one image, split by chunks or not) and one between; whole
    prompts with an explicit budget likewise."""
    prompts, params, loras, num_images = _requests(family, tiny_model, adapter_factory)
    whole, _, engine = _run(tiny_model, prompts, params, loras, enable_chunked_prefill=False)
    assert engine.core.scheduler.max_encoder_tokens is None  # no budget without chunking unless one is set
    sizes = sorted(item.num_tokens for p in prompts for item in engine.input_processor.process(p)[1].images)
    for options in (dict(max_num_batched_tokens=16, max_num_encoder_input_tokens=1),
                    dict(max_num_batched_tokens=BUDGET, max_num_encoder_input_tokens=sizes[-1] + 1),
                    dict(max_num_batched_tokens=64, max_num_encoder_input_tokens=sizes[0] + sizes[1])):
        out, embedded, engine = _run(tiny_model, prompts, params, loras, **options)
        assert out == whole, options
        # each image at most once; the same picture and embedding twice in one step once (three distinct pairs:
        # image 0 under "vis", images 1 and 2 under the base embedding, which the LM-only adapter keeps)
        assert 3 <= embedded <= num_images
        assert engine.core.scheduler.max_encoder_tokens == options["max_num_encoder_input_tokens"]
        if options["max_num_encoder_input_tokens"] == 1:
            assert set(engine.passes) == {1}  # each vision pass one image: every one is over the budget
    out, embedded, engine = _run(tiny_model, prompts, params, loras, enable_chunked_prefill=False,
                                 max_num_encoder_input_tokens=1)
    assert out == whole and embedded == num_images
    assert max(engine.passes) == 2  # one prompt's images (the one with two) in a step: whole prompts are never cut


@pytest.mark.families("qwen2_vl")
def test_encoder_budget_defaults_to_the_token_budget(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", max_num_seqs=4, max_num_batched_tokens=96,
              num_kv_blocks=64)
    assert llm.engine.core.scheduler.max_encoder_tokens == 96


def test_encoder_budget_flag():
    from valora.server.cli import add_arguments, engine_config

    p = argparse.ArgumentParser()
    add_arguments(p)
    assert engine_config(p.parse_args(["m"])).scheduler.max_num_encoder_input_tokens is None
    args = p.parse_args(["m", "--max-num-encoder-input-tokens", "512"])
    assert engine_config(args).scheduler.max_num_encoder_input_tokens == 512


# -- the scheduler alone: the runner's part played by `_step` -------------------------------------------------------

def _prompt(i: int, parts: list) -> Sequence:
    """A sequence of text runs (ints: token counts) and images ((tokens, content) tuples)."""
    tokens, images = [], []
    for part in parts:
        if isinstance(part, int):
            tokens += [7] * part
        else:
            images.append(ImageItem({}, part[0], len(tokens), part[1]))
            tokens += [9] * part[0]
    return Sequence(i, f"r{i}", 0, ProcessedPrompt(tokens, images), SamplingParams(max_tokens=3), None, float(i))


def _step(sched: Scheduler, cache: EmbeddingCache | None) -> tuple[list, list[int]]:
    """Schedule a step and do the runner's part: the image tokens encoded (by the runner's rule), the sequences
    advanced, those done removed."""
    out = sched.schedule()
    encoded = []
    for seq, n in zip(out.seqs, out.num_tokens):
        start, end = seq.num_computed, seq.num_computed + n
        for k, item in enumerate(seq.prompt.images):
            if max(item.offset, start) < min(item.offset + item.num_tokens, end) \
                    and seq.cached_embeds(k, cache) is None:
                encoded.append(item.num_tokens)
                seq.image_embeds[k] = torch.zeros(item.num_tokens, 2)
                if cache is not None:
                    cache.put(seq.image_key(k), seq.image_embeds[k])
            if item.offset + item.num_tokens <= end:
                seq.image_embeds[k] = None  # dropped once no later chunk takes its rows
        seq.num_computed = end
        sched.blocks.cache_blocks(seq)
        if end == len(seq):
            seq.output_ids.append(1)
            if len(seq.output_ids) == seq.params.max_tokens:
                sched.remove(seq)
    assert sum(out.encoder_tokens) == sum(encoded)  # the scheduler charged exactly what the runner encodes
    return out, encoded


def _burst(encoder_budget: int | None, cache: EmbeddingCache | None = None, chunked: bool = True,
           with_charges: bool = False, shared: bool = False, outs: list | None = None):
    """4 running text streams, then 10 image prompts at once (one to three images of 6 to 24 tokens, some repeated);
    `outs` collects every step's scheduler output."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=16, enable_chunked_prefill=chunked, encoder_in_token_budget=shared),
                      BlockManager(256, 4),
                      max_batched_tokens=48 if chunked else 1024, max_loras=None, max_encoder_tokens=encoder_budget,
                      embed_cache=cache)
    streams = [_prompt(i, [5]) for i in range(4)]
    for s in streams:
        s.params = SamplingParams(max_tokens=1000)
        sched.add(s)
    _step(sched, cache)
    layouts = [[3, (24, "a"), 4], [(6, "b"), 2, (6, "c"), 3], [2, (12, "d"), (8, "e"), 1, (10, "f"), 2],
               [5, (6, "b"), 2], [1, (24, "g"), 1], [(8, "h"), (8, "i"), 4], [3, (12, "d"), 2],
               [4, (16, "j"), 3], [(6, "k"), 9], [2, (20, "l"), (6, "m"), 2]]
    prompts = [_prompt(10 + i, parts) for i, parts in enumerate(layouts)]
    for seq in prompts:
        sched.add(seq)
    steps, charged = [], []  # per step: image tokens encoded, by image; those charged, by sequence
    while any(seq.output_ids[-3:] != [1, 1, 1] for seq in prompts):
        out, encoded = _step(sched, cache)
        assert all(s in out.seqs for s in streams)  # the running streams decode every step
        steps.append(encoded)
        charged.append([c for c in out.encoder_tokens if c])
        if outs is not None:
            outs.append(out)
        assert len(steps) < 100
    return (steps, charged) if with_charges else steps


def test_encoder_budget_bounds_a_burst():
    for budget in (12, 16, 30):
        for cache in (None, EmbeddingCache(2**20)):
            steps = _burst(budget, cache)
            assert all(len(e) <= 1 or sum(e) <= budget for e in steps), (budget, steps)  # beyond the first: budget
            images = 13 if cache is not None else 15  # "b" and "d" repeat: encoded once with the cache
            assert sum(len(e) for e in steps) == images
    unbounded = _burst(None)
    assert max(sum(e) for e in unbounded) > 30  # without it the 48-token budget starts several images in a step
    assert max(len(e) for e in _burst(48)) >= 3  # a budget as large as the token budget: still several small ones


def test_image_over_the_encoder_budget_is_scheduled():
    """Images larger than the budget each take a step of their own (behind a small image or not); none starves."""
    steps = _burst(1)
    assert [len(e) for e in steps if e] == [1] * 15
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 4), max_batched_tokens=8, max_loras=None,
                      max_encoder_tokens=4)
    small, big = _prompt(0, [1, (3, "s"), 1]), _prompt(1, [2, (40, "big"), 2])
    sched.add(small)
    sched.add(big)
    out, encoded = _step(sched, None)
    assert encoded == [3] and out.num_tokens == [5, 2]  # the big one's chunk ends before its image
    out, encoded = _step(sched, None)
    assert encoded == [40] and out.num_tokens == [1, 7]  # the step's first image: encoded, whatever its size
    while big.num_computed < big.prompt_len:
        out, encoded = _step(sched, None)
        assert encoded == []
    assert big.output_ids == [1]


def test_encoder_in_the_token_budget_bounds_each_step():
    """Images charging the token budget: a step's tokens plus the image tokens it encodes stay within the 48-token
    budget, except a step whose only prompt work is one image (its chunk then just reaches the image's span, the
    rest following in later steps); every image is still encoded once and every prompt finishes."""
    for encoder_budget in (None, 16, 48):
        outs: list = []
        steps = _burst(encoder_budget, shared=True, outs=outs)
        assert sum(len(e) for e in steps) == 15
        for out in outs:
            prompt_tokens = sum(n for n, seq in zip(out.num_tokens, out.seqs) if seq.prompt_len > 5)
            work = sum(out.num_tokens) + sum(out.encoder_tokens)
            charged = [c for c in out.encoder_tokens if c]
            alone = len(charged) == 1 and prompt_tokens <= 24  # one image, with what reaches it and no other prompt
            assert work <= 48 or alone, (encoder_budget, out.num_tokens, out.encoder_tokens)
        separate: list = []
        _burst(encoder_budget, outs=separate)  # without it, image work comes on top of a full token budget
        assert max(sum(o.num_tokens) + sum(o.encoder_tokens) for o in separate) > 48


def test_encoder_in_token_budget_gives_the_same_tokens_and_flag(family, tiny_model, adapter_factory):
    from valora.server.cli import add_arguments, engine_config

    prompts, params, loras, _ = _requests(family, tiny_model, adapter_factory)
    whole, _, _ = _run(tiny_model, prompts, params, loras, enable_chunked_prefill=False)
    for budget in (BUDGET, 16):
        out, _, engine = _run(tiny_model, prompts, params, loras, max_num_batched_tokens=budget,
                              encoder_in_token_budget=True)
        assert out == whole and engine.core.scheduler.encoder_in_token_budget
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert not engine_config(p.parse_args(["m"])).scheduler.encoder_in_token_budget
    assert engine_config(p.parse_args(["m", "--encoder-in-token-budget"])).scheduler.encoder_in_token_budget


def test_whole_prompts_with_an_encoder_budget():
    """Without chunking a prompt is never cut: it is admitted whole as the step's first encoder work, else when its
    images fit what is left."""
    steps, charged = _burst(16, chunked=False, with_charges=True)
    assert all(len(c) <= 1 or sum(c) <= 16 for c in charged)  # beyond the first prompt's images: the budget
    assert any(len(e) > 1 for e in steps)  # a prompt's two or three images in one step
    first, *rest = [e for e in steps if e]
    assert first == [24]  # the first prompt's image, over the budget; the second prompt's two wait for the next step
    assert sum(len(e) for e in steps) == 15
