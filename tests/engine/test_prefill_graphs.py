"""Short prefill steps without adapter work run on static batches padded to a token bucket (engine/prefill_graphs.py):
the same tokens as plain steps, for prompts with images, several prompts in one step, chunks of a prompt (a cached
prefix), while steps with adapter work, decodes or too many tokens stay eager. The static batches run eagerly on the
CPU (capture off, what --enforce-eager does); the replay needs a GPU."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, LoRARequest, SamplingParams
from valora.engine.prefill_graphs import PrefillGraphs, token_buckets
from valora.testing.images import random_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_token_buckets_pad_a_prompt_by_little():
    assert token_buckets(1024)[:9] == [32, 64, 96, 128, 160, 192, 224, 256, 320]
    assert token_buckets(1024)[-3:] == [768, 896, 1024]
    assert token_buckets(100) == [32, 64, 96, 128]
    assert all(b - a <= 128 for a, b in zip(token_buckets(4096), token_buckets(4096)[1:]))


def _requests(family, model_dir, adapter_factory):
    """(prompts, adapters) submitted one group at a time: each group's first step holds exactly these prompts."""
    lm = adapter_factory(model_dir, r=8, target_modules=family.targets("lm", ("q_proj", "v_proj")), seed=3)
    img = family.image_prompt
    return [
        ([{"prompt": f"{img} what is shown here ?", "multi_modal_data": {"image": random_image(80, 100, seed=1)}}],
         [None]),
        (["a short one", "another prompt of a few more words",
          {"prompt": f"{img} caption", "multi_modal_data": {"image": random_image(56, 56, seed=2)}}], [None] * 3),
        (["this prompt runs with an adapter"], [LoRARequest("lm", 1, str(lm))]),
        (["a long prompt " + "with many words " * 12], [None]),  # over the 64-token buckets: eager
    ]


def _run(model_dir, groups, static: bool, **options):
    llm = LLM(str(model_dir), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
              max_num_seqs=4, enable_prefix_caching=False, embed_cache_mb=0, **options)
    runner = llm.engine.core.runner
    served = []
    if static:
        graphs = PrefillGraphs(runner.model, runner.kv_caches, max_blocks_per_seq=runner.max_blocks_per_seq,
                               block_size=runner.blocks.block_size, pad_slot=runner.pad_slot, device=runner.device,
                               capture=False, max_tokens=64)
        run = graphs.run
        graphs.run = lambda embeds, batch: served.append(embeds.shape[0]) or run(embeds, batch)
        runner.prefill_graphs = graphs
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    tokens = [[o.outputs[0].token_ids for o in llm.generate(prompts, params, loras, use_tqdm=False)]
              for prompts, loras in groups]
    return tokens, served


@pytest.mark.parametrize("chunk", [None, 8])
def test_padded_prefills_give_the_tokens_of_plain_steps(family, tiny_model, adapter_factory, chunk):
    groups = _requests(family, tiny_model, adapter_factory)
    options = {"max_num_batched_tokens": chunk} if chunk else {"enable_chunked_prefill": False}
    plain, _ = _run(tiny_model, groups, static=False, **options)
    padded, served = _run(tiny_model, groups, static=True, **options)
    assert padded == plain
    if chunk:  # every prompt goes in chunks of at most 8 tokens, the adapter's aside
        assert served and max(served) <= chunk
    else:  # the image prompt and the three together; not the adapter's, not the long one
        assert len(served) == 2 and served[1] > served[0]


@needs_cuda
@pytest.mark.families("qwen2_vl", "internvl")
def test_prefill_replay_equals_padded_eager(family, tiny_model, adapter_factory):
    groups = _requests(family, tiny_model, adapter_factory)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cuda",
                  max_num_seqs=4, enforce_eager=eager, gpu_memory_utilization=0.3)
        params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        outs[eager] = [[o.outputs[0].token_ids for o in llm.generate(p, params, lr, use_tqdm=False)]
                       for p, lr in groups]
        assert (len(llm.engine.core.runner.prefill_graphs.graphs) >= 2) != eager
        del llm
        torch.cuda.empty_cache()
    assert outs[False] == outs[True]
