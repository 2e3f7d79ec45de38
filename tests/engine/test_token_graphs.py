"""Steps with prefill work run on static batches padded to a token bucket (engine/token_graphs.py): prompts alone,
and prompt chunks mixed with running decodes, with adapters of mixed ranks, merged (mixture) or not, images, several
prompts in one step, chunks with a cached prefix; they give the tokens of plain steps, while a step with too many
tokens stays eager. The static batches run eagerly on the CPU (capture off, what --enforce-eager does; LoRA through
`gather`, a backend graphs can capture); the replay needs a GPU."""

from __future__ import annotations

import pytest
import torch

from tests.orchestrator.test_modes import FixedHot
from valora import LLM, LoRARequest, SamplingParams
from valora.engine.token_graphs import TokenVariant, token_buckets
from valora.testing.images import random_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
MAX_TOKENS = 96  # the test's largest step with a graph (buckets up to 128): the first group's three prompts


def test_token_buckets_pad_a_prompt_by_little():
    assert token_buckets(1024)[:9] == [32, 64, 96, 128, 160, 192, 224, 256, 320]
    assert token_buckets(1024)[-3:] == [768, 896, 1024]
    assert token_buckets(100) == [32, 64, 96, 128]
    assert token_buckets(2049)[-2:] == [2048, 2080]  # a whole budget keeps a padding row
    assert all(b - a <= 128 for a, b in zip(token_buckets(4096), token_buckets(4096)[1:]))


def _groups(family, model_dir, adapter_factory):
    """(prompts, adapters, max_tokens) submitted one group at a time. The first group's prompts finish at different
    steps, so later admissions and chunks share steps with running decodes."""
    a = LoRARequest("a", 1, str(adapter_factory(model_dir, r=8, target_modules=family.targets("lm", ("q_proj",
                                                                                                   "v_proj")),
                                                seed=3)))
    b = LoRARequest("b", 2, str(adapter_factory(model_dir, r=4, target_modules=family.targets("lm"), seed=4)))
    img = family.image_prompt
    return [
        ([{"prompt": f"{img} what is shown here ?", "multi_modal_data": {"image": random_image(80, 100, seed=1)}},
          "a short one with an adapter", "another prompt of a few more words, with the other adapter",
          {"prompt": f"{img} caption", "multi_modal_data": {"image": random_image(56, 56, seed=2)}}],
         [None, a, b, a], [2, 6, 3, 5]),
        (["a long prompt " + "with many words " * 12, "and a short one"], [b, None], [3, 3]),  # over 128: eager
    ]


def _run(model_dir, groups, static: bool, policy=None, **options):
    """Each group's tokens, and per group the (variant, whether the step had decodes, whether no sequence ran
    several tokens) the token graphs served."""
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, lora_backend="gather",
              dtype="float32", device="cpu", max_num_seqs=3, enable_prefix_caching=False, embed_cache_mb=0, **options)
    core = llm.engine.core
    if policy is not None:
        core.policy = policy
    runner = core.runner
    served: list[tuple[TokenVariant, bool, bool]] = []
    if static:
        runner.enable_cuda_graphs(3, 2, capture=False, max_num_batched_tokens=MAX_TOKENS)  # decode steps too
        graphs = runner.token_graphs
        run = graphs.run
        graphs.run = lambda embeds, batch: served.append(
            (graphs.variant(batch), batch.attn.decode_rows is not None, not batch.attn.prefill_host)
        ) or run(embeds, batch)
    tokens, variants = [], []
    for prompts, loras, lengths in groups:
        params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, loras, use_tqdm=False)])
        variants.append(served[:])
        served.clear()
    return tokens, variants


@pytest.mark.parametrize("chunk", [None, 8])
def test_padded_steps_give_the_tokens_of_plain_steps(family, tiny_model, adapter_factory, chunk):
    groups = _groups(family, tiny_model, adapter_factory)
    options = {"max_num_batched_tokens": chunk} if chunk else {"enable_chunked_prefill": False}
    plain, _ = _run(tiny_model, groups, static=False, **options)
    padded, served = _run(tiny_model, groups, static=True, **options)
    assert padded == plain
    mixed = [v for v, decodes, _ in served[0] if decodes]
    assert mixed and any(v.lora.adapters for v in mixed)  # decodes beside a prompt (or a chunk) with adapters
    if chunk:  # every step within the budget: all served, the long prompt's chunks too
        assert max(v.tokens for group in served for v, _, _ in group) == 32 and served[1]
    else:  # three prompts with two adapters at once, no decodes yet (the same graph); the long prompt runs eagerly
        assert any(not decodes and v.lora.adapters == 2 for v, decodes, _ in served[0]) and not served[1]


@pytest.mark.families("qwen2_vl")
def test_padded_mixture_steps_give_the_tokens_of_plain_steps(family, tiny_model, adapter_factory):
    """An adapter merged into the weights: the other requests' tokens take it back out (corrections)."""
    groups = _groups(family, tiny_model, adapter_factory)[:1]
    plain, _ = _run(tiny_model, groups, static=False, policy=FixedHot("a"), max_num_batched_tokens=8)
    padded, served = _run(tiny_model, groups, static=True, policy=FixedHot("a"), max_num_batched_tokens=8)
    assert padded == plain
    assert any(decodes and v.lora.correction and any(v.lora.merged) for v, decodes, _ in served[0])


@pytest.mark.families("qwen2_vl")
def test_a_step_whose_prompt_work_is_one_image_token_is_padded_too(family, tiny_model, adapter_factory):
    """An image's vision pass charging the token budget (16): the first step takes the other prompt's 7 tokens and
    the text before the image, which does not fit beside them; the next one a decode and the single token that
    reaches the image, whose pass takes the rest of the budget: single tokens only, but with an image row, which
    the decode graphs (token ids in, no image rows) cannot take."""
    a = LoRARequest("a", 1, str(adapter_factory(tiny_model, r=8, target_modules=family.targets("lm"), seed=3)))
    prompts = ["a short one", {"prompt": f"hi {family.image_prompt} what is it ?",
                               "multi_modal_data": {"image": random_image(112, 112, seed=1)}}]
    groups = [(prompts, [a, None], [8, 4])]
    options = dict(max_num_batched_tokens=16, encoder_in_token_budget=True)
    plain, _ = _run(tiny_model, groups, static=False, **options)
    padded, served = _run(tiny_model, groups, static=True, **options)
    assert padded == plain
    assert any(decodes and single for _, decodes, single in served[0])


@needs_cuda
@pytest.mark.families("qwen2_vl", "internvl")
@pytest.mark.parametrize("chunk", [None, 8])
def test_token_graph_replay_equals_padded_eager(family, tiny_model, adapter_factory, chunk):
    groups = _groups(family, tiny_model, adapter_factory)
    options = {"max_num_batched_tokens": chunk} if chunk else {"enable_chunked_prefill": False}
    outs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cuda",
                  max_num_seqs=3, enforce_eager=eager, gpu_memory_utilization=0.3, **options)
        llm.engine.core.policy = FixedHot("a" if chunk else None)
        outs[eager] = []
        for prompts, loras, lengths in groups:
            params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
            outs[eager].append([o.outputs[0].token_ids for o in llm.generate(prompts, params, loras, use_tqdm=False)])
        graphs = llm.engine.core.runner.token_graphs.graphs
        assert (any(v.lora.adapters for v in graphs) and len(graphs) >= 3) != eager
        del llm
        torch.cuda.empty_cache()
    assert outs[False] == outs[True]


@pytest.mark.families("qwen2_vl")
def test_startup_captures_the_largest_adapter_bucket_first_then_every_unmerged_variant(tiny_model):
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=8, lora_backend="gather",
              dtype="float32", device="cpu", max_num_seqs=3)
    llm.engine.core.runner.enable_cuda_graphs(3, 4, capture=False, max_num_batched_tokens=MAX_TOKENS)
    graphs = llm.engine.core.runner.token_graphs
    order = [(v.tokens, v.lora.adapters) for v in graphs.startup_variants()]
    assert order[:4] == [(128, 4), (96, 4), (64, 4), (32, 4)]
    assert order[4:8] == [(128, 0), (96, 0), (64, 0), (32, 0)]
    assert order[8] == (128, 2)
    assert sorted(order) == sorted((b, a) for b in graphs.buckets for a in (0, 1, 2, 4) if a <= b)
    assert not any(v.lora.correction or any(v.lora.merged) for v in graphs.startup_variants())
