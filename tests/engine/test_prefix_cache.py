"""Acceptance (issue 16, 4): prefix caching changes no output (adapters, images, preemption), never lets one adapter
registration read another's KV (another adapter, or the same name unloaded and loaded again), evicts the least
recently used blocks under pressure, and still computes the last prompt token on a full hit."""

from __future__ import annotations

import pytest

from valora import LLM, LoRARequest, SamplingParams
from valora.engine.block_manager import BlockManager
from valora.engine.sequence import Sequence
from valora.multimodal.inputs import ImageItem, ProcessedPrompt
from valora.sampling_params import SamplingParams as Params
from valora.server.metrics import ServerMetrics
from valora.testing.images import random_image

SYSTEM = "you are a careful assistant ; look at the picture and answer the question in a few words . " * 2
GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


# -- the block manager alone -----------------------------------------------------------------------------------
def _seq(tokens: list[int], adapter: str | None = None, images: list[ImageItem] | None = None) -> Sequence:
    s = Sequence(0, "r", 0, ProcessedPrompt(tokens, images or []), Params(), None, 0.0)
    s.adapter_key = adapter
    return s


def _compute(blocks: BlockManager, seq: Sequence) -> None:
    """Admit `seq` with its cached prefix and compute the rest, as the scheduler and the engine do."""
    prefix = blocks.cached_prefix(seq)
    blocks.allocate(seq, len(seq), prefix)
    seq.num_computed = len(seq)
    blocks.cache_blocks(seq)


def test_full_blocks_are_shared_by_exact_prefix_only():
    blocks = BlockManager(16, 4, enable_caching=True)
    first = _seq(list(range(13)), "a#1")
    _compute(blocks, first)
    assert blocks.cached_prefix(_seq(list(range(13)), "a#1")) == first.block_table[:3]
    assert blocks.cached_prefix(_seq(list(range(9)) + [99] * 4, "a#1")) == first.block_table[:2]
    assert blocks.cached_prefix(_seq(list(range(12)), "a#1")) == first.block_table[:2]  # the last token: computed
    assert blocks.cached_prefix(_seq(list(range(13)), "a#2")) == []  # another registration of the adapter
    assert blocks.cached_prefix(_seq(list(range(13)), None)) == []  # the base model
    image = ImageItem({}, 3, 5, "pixels-1")
    with_image = _seq(list(range(13)), "a#1", [image])
    _compute(blocks, with_image)
    other_image = _seq(list(range(13)), "a#1", [ImageItem({}, 3, 5, "pixels-2")])
    assert blocks.cached_prefix(other_image) == with_image.block_table[:1]  # the image starts in the second block
    assert blocks.cached_prefix(_seq(list(range(13)), "a#1", [image])) == with_image.block_table[:3]


def test_shared_blocks_live_while_referenced_and_evict_least_recent_first():
    blocks = BlockManager(6, 4, enable_caching=True)
    a, b = _seq(list(range(13)), "x#1"), _seq(list(range(13)), "x#1")
    _compute(blocks, a)  # 4 blocks, 3 of them full and cached
    _compute(blocks, b)  # shares those 3, takes 1 of its own
    assert b.block_table[:3] == a.block_table[:3] and blocks.num_free == 1
    blocks.free(a)
    assert blocks.num_free == 2 and not blocks.evictable  # the shared blocks are still b's
    shared = b.block_table[:3]
    blocks.free(b)
    assert list(blocks.evictable) == shared[::-1] and blocks.num_free == 6  # the tail is the least recent
    c = _seq([50 + i for i in range(16)], None)
    _compute(blocks, c)  # 4 blocks: the 3 free ones (never full, so never cached), then the least recent cached one
    assert shared[2] in c.block_table and shared[:2] == list(blocks.evictable)[::-1]
    assert blocks.cached_prefix(_seq(list(range(13)), "x#1")) == shared[:2]


# -- the engine ------------------------------------------------------------------------------------------------
def _llm(model_dir, **options) -> LLM:
    return LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
               block_size=8, **options)


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def test_same_outputs_with_and_without_prefix_caching(family, tiny_model, adapter_factory):
    vis = adapter_factory(tiny_model, r=4, target_modules=f"{family.targets('vision')}|{family.targets('lm')}", seed=1)
    lm = adapter_factory(tiny_model, r=8, target_modules=family.targets("lm", ("q_proj", "v_proj")), seed=2)
    loras = [LoRARequest("vis", 1, str(vis)), LoRARequest("lm", 2, str(lm)), None]
    frames = [random_image(56, 84, seed=s) for s in range(2)]
    waves = []
    for question in ("what is shown ?", "how many objects ?", "which colour ?"):
        waves.append([{"prompt": f"{SYSTEM}{family.image_prompt} {question}", "multi_modal_data": {"image": f}}
                      for f in frames] + [f"{SYSTEM}{question}"])
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    params = [greedy, SamplingParams(temperature=0.9, seed=7, max_tokens=10, ignore_eos=True), greedy]

    def run(**options):
        llm = _llm(tiny_model, max_num_seqs=4, **options)
        outs = [_tokens(llm.generate(w * 3, params * 3, [lr for lr in loras for _ in w], use_tqdm=False))
                for w in waves]  # every prompt under every adapter, wave after wave
        return outs, llm.engine

    plain, _ = run(enable_prefix_caching=False)
    cached, engine = run()
    longest = max(len(engine.input_processor.process(p)[1].token_ids) for w in waves for p in w) + 10
    tight, tight_engine = run(num_kv_blocks=-(-longest // 8) + 1)  # even sharing their prefix, four do not fit
    assert cached == plain and tight == plain
    stats, tight_stats = engine.core.stats(), tight_engine.core.stats()
    assert stats.prefix_cache_hits > 0.3 * stats.prefix_cache_queries
    assert tight_stats.num_preemptions > 0 and tight_stats.prefix_cache_hits > 0
    assert tight_engine.core.blocks.num_free == tight_engine.core.blocks.num_blocks


@pytest.mark.families("qwen2_vl")
def test_adapters_and_reloads_never_share_blocks(tiny_model, adapter_factory):
    paths = [str(adapter_factory(tiny_model, r=8, target_modules=family_lm(), seed=s)) for s in (11, 12)]
    prompt = f"{SYSTEM}tell me a story ."
    llm = _llm(tiny_model)
    engine = llm.engine

    def ask(lora: LoRARequest | None):
        out = llm.generate(prompt, GREEDY, lora, use_tqdm=False)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    n = len(engine.input_processor.process(prompt)[1].token_ids)
    full_hit = (n - 1) // 8 * 8
    a, b = LoRARequest("a", 1, paths[0]), LoRARequest("b", 2, paths[1])
    first_a = ask(a)
    assert first_a[0] == 0
    assert ask(b)[0] == 0 and ask(None)[0] == 0  # the same tokens under another adapter, or none
    assert ask(a) == (full_hit, first_a[1])  # a hit on everything but the last token, and the same answer
    engine.core.remove_lora("a")
    assert ask(LoRARequest("a", 1, paths[0])) == (0, first_a[1])  # loaded again: its old blocks are not its own
    engine.core.remove_lora("a")
    swapped = ask(LoRARequest("a", 1, paths[1]))  # the same name, other weights
    fresh = _llm(tiny_model).generate(prompt, GREEDY, LoRARequest("a", 1, paths[1]), use_tqdm=False)[0]
    assert swapped == (0, fresh.outputs[0].token_ids)
    stats = engine.core.stats()
    assert stats.prefix_cache_queries == 6 * n and stats.prefix_cache_hits == full_hit
    text = ServerMetrics("m", engine.core.stats).render().decode()
    assert f'valora:prefix_cache_queries_total{{model_name="m"}} {6.0 * n}' in text
    assert f'valora:prefix_cache_hits_total{{model_name="m"}} {float(full_hit)}' in text
    assert f'valora:prefix_cache_hit_rate{{model_name="m"}} {full_hit / (6 * n)}' in text


def family_lm() -> str:
    from valora.testing.families import FAMILIES

    return FAMILIES["qwen2_vl"].targets("lm", ("q_proj", "k_proj", "v_proj"))


@pytest.mark.families("qwen2_vl")
def test_images_bound_the_hit_and_pressure_evicts_the_oldest(tiny_model):
    llm = _llm(tiny_model, num_kv_blocks=40)
    engine = llm.engine
    img = "<|vision_start|><|image_pad|><|vision_end|>"

    def ask(text: str, seed: int):
        out = llm.generate({"prompt": text, "multi_modal_data": {"image": random_image(56, 56, seed=seed)}}, GREEDY,
                           use_tqdm=False)[0]
        return out.num_cached_tokens, out.outputs[0].token_ids

    prompt = f"{SYSTEM}{img} what is it ?"
    offset = engine.input_processor.process({"prompt": prompt, "multi_modal_data": {"image": random_image(56, 56)}})[1]
    offset = offset.images[0].offset
    _, first = ask(prompt, 0)
    assert ask(prompt, 1)[0] == offset // 8 * 8  # another image: only the blocks before it
    others = [f"{i} {SYSTEM}{img} what is it ?" for i in range(6)]  # no shared prefix; 6 x ~6 blocks > 40
    for i, text in enumerate(others):
        ask(text, 10 + i)
    assert ask(prompt, 0) == (0, first)  # evicted by the newer requests, recomputed the same
    assert ask(others[-1], 15)[0] > 0  # the most recent one is still there
