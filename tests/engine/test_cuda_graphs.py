"""Decode steps replayed from CUDA graphs give the tokens eager steps give: any batch size (padded to its bucket),
any mix of adapters (a graph per adapter-count bucket, refilled metadata), merged and mixture modes, images in the
prefill. The graph tests need a GPU; the static batches behind them (capture off) also run on the CPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.engine.cuda_graphs import batch_buckets
from valora.engine.graph_lora import adapter_buckets
from valora.testing.images import random_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(128)[:6] == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(100)[-1] == 100 and batch_buckets(300)[-1] == 300


def test_adapter_buckets_are_powers_of_two_up_to_the_batch_or_max_loras() -> None:
    assert adapter_buckets(1, 32) == [1]
    assert adapter_buckets(32, 32) == [1, 2, 4, 8, 16, 32]
    assert adapter_buckets(24, 32) == [1, 2, 4, 8, 16, 24]
    assert adapter_buckets(128, 8) == [1, 2, 4, 8]
    assert adapter_buckets(64, 6) == [1, 2, 4, 6]


def _adapters(family, tiny_model, adapter_factory) -> list[LoRARequest]:
    return [LoRARequest(f"a{i}", i + 1, str(adapter_factory(tiny_model, r=r, seed=10 + i,
                                                            target_modules=family.targets("lm", LM_LINEARS))))
            for i, r in enumerate((4, 16, 8))]


def _record_buckets(graphs, served: set) -> None:
    """Add the (batch, adapters) bucket of every step the graph runner serves to `served`."""
    run = graphs.run

    def recorded(batch):
        v = graphs.variant(batch)
        served.add((v.size, v.lora.adapters))
        return run(batch)

    graphs.run = recorded


@pytest.mark.families("qwen2_vl")
def test_static_batches_per_adapter_bucket_match_plain_steps(family, tiny_model, adapter_factory) -> None:
    """Decode steps through the graph runner's padded static batches (capture off, the atmm kernels) give the tokens
    of plain steps, each batch in the bucket of its size and distinct adapters."""
    adapters = _adapters(family, tiny_model, adapter_factory)
    runs = [  # (prompts' adapters, the (batch, adapters) bucket their decode steps take)
        ([adapters[0], adapters[1], None, adapters[0], adapters[2]], (8, 4)),
        ([adapters[1], adapters[1]], (2, 1)),
        ([None, None, None], None),
    ]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = {}
    for static in (False, True):
        llm = LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=16, lora_backend="atmm",
                  max_num_seqs=8, scheduler="slora", num_kv_blocks=256)  # two engines in one process
        runner = llm.engine.core.runner
        served = set()
        if static:
            runner.enable_cuda_graphs(8, 4, capture=False)
            _record_buckets(runner.graphs, served)
        for loras, bucket in runs:
            prompts = [f"request {i} " + "word " * i for i in range(len(loras))]
            outs[static, bucket] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, loras,
                                                                               use_tqdm=False)]
            if static:  # the last decode steps of a run have the batch's (size, adapters) bucket
                assert bucket is None or bucket in served
                served.clear()
    for _, bucket in runs:
        assert outs[True, bucket] == outs[False, bucket]


@needs_cuda
@pytest.mark.families("qwen2_vl")
@pytest.mark.parametrize("scheduler", ["slora", "punica", "valora"])
def test_graph_replay_equals_eager(family, tiny_model, adapter_factory, scheduler) -> None:
    adapters = _adapters(family, tiny_model, adapter_factory)
    prompts, loras = [], []
    for i in range(13):  # not a bucket size: padded rows must not disturb real ones
        text = f"request {i} " + "word " * (i % 5)
        if i % 4 == 0:
            prompts.append({"prompt": f"{family.image_prompt} {text}",
                            "multi_modal_data": {"image": random_image(56, 56, seed=i)}})
        else:
            prompts.append(text)
        # valora merges a hot adapter: make a0 hot so merged and mixture steps happen
        loras.append(adapters[0] if i % 3 else (None if i % 2 else adapters[1 + i % 2]))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    outs = {}
    for eager in (True, False):
        llm = LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32",
                  device="cuda", max_num_seqs=16, scheduler=scheduler, enforce_eager=eager, num_kv_blocks=256)
        assert llm.engine.core.runner.graphs.capture != eager
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, loras, use_tqdm=False)]
        assert (len(llm.engine.core.runner.graphs.graphs) > 0) != eager
        del llm
        torch.cuda.empty_cache()
    assert outs[False] == outs[True]


@needs_cuda
@pytest.mark.families("qwen2_vl")
def test_capture_budget_leaves_adapter_buckets_to_first_use(tiny_model) -> None:
    """Start-up captures every batch size without adapters and with the most adapters; with no budget left the
    smaller adapter buckets wait for a step that needs them."""
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32", device="cuda",
              max_num_seqs=8, num_kv_blocks=256)
    graphs = llm.engine.core.runner.graphs
    graphs.graphs.clear()
    graphs.capture_common(budget_s=0.0)
    assert {(v.size, v.lora.adapters) for v in graphs.graphs} == {(b, a) for b in graphs.buckets
                                                             for a in (0, min(b, 4))}
