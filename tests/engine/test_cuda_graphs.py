"""Decode steps replayed from CUDA graphs give the tokens eager steps give: any batch size (padded to its bucket),
any mix of adapters (one graph, refilled metadata), merged and mixture modes, images in the prefill. GPU only."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.engine.cuda_graphs import batch_buckets
from valora.testing.images import random_image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def test_buckets_cover_every_batch_size() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(128)[:6] == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(100)[-1] == 100 and batch_buckets(300)[-1] == 300


@pytest.mark.families("qwen2_vl")
@pytest.mark.parametrize("scheduler", ["slora", "punica", "valora"])
def test_graph_replay_equals_eager(family, tiny_model, adapter_factory, scheduler) -> None:
    adapters = [LoRARequest(f"a{i}", i + 1, str(adapter_factory(tiny_model, r=r, seed=10 + i,
                                                                 target_modules=family.targets("lm", LM_LINEARS))))
                for i, r in enumerate((4, 16, 8))]
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
                  device="cuda", max_num_seqs=16, scheduler=scheduler, enforce_eager=eager,
                  gpu_memory_utilization=0.3)
        assert llm.engine.runner.graphs.capture != eager
        outs[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, loras, use_tqdm=False)]
        assert (len(llm.engine.runner.graphs.graphs) > 0) != eager
        del llm
        torch.cuda.empty_cache()
    assert outs[False] == outs[True]
