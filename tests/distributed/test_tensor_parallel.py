"""Acceptance (issue 20, tensor parallelism): greedy outputs with tensor_parallel_size=2 (two gloo processes)
equal one process's, token for token, in unmerged, mixture and merged modes, with adapters on every linear layer
of the language model, the vision tower and the projector, images included."""

from __future__ import annotations

import pytest

from tests.conftest import LM_LINEARS
from tests.orchestrator.test_modes import FixedHot
from valora import LLM, LoRARequest, SamplingParams
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image

pytestmark = pytest.mark.families("qwen2_vl", "llava")


@pytest.fixture(scope="module")
def adapters(family, tiny_model, adapter_factory):
    everything = "|".join([family.targets("vision"), family.targets("projector"), peft_target_regex(LM_LINEARS)])
    return {
        "A": adapter_factory(tiny_model, r=8, target_modules=everything, seed=31),
        "B": adapter_factory(tiny_model, r=4, lora_alpha=16, target_modules=peft_target_regex(LM_LINEARS), seed=32),
    }


def _run(tiny_model, adapters, family, tensor_parallel_size: int) -> dict[str, list]:
    img = family.image_prompt
    cases = [("a red car", "A"), (f"{img} what digit ?", "A"), ("the quick fox", None), (f"{img} caption", "B"),
             ("hello world", "B"), (f"{img} count", None)]
    prompts = [{"prompt": p, "multi_modal_data": {"image": [random_image(56, 70, seed=i)] if img in p else []}}
               for i, (p, _) in enumerate(cases)]
    loras = [LoRARequest(a, ord(a), str(adapters[a])) if a else None for _, a in cases]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
              tensor_parallel_size=tensor_parallel_size)
    try:
        attn = llm.engine.core.model.language_model.layers[0].self_attn
        assert (attn.num_heads, attn.num_kv_heads) == (4 // tensor_parallel_size, 2 // tensor_parallel_size)
        out, hot_a = {}, [i for i, (_, a) in enumerate(cases) if a == "A"]
        for mode, policy, which in (("unmerged", FixedHot(None), range(len(cases))),
                                    ("mixture", FixedHot("A"), range(len(cases))), ("merged", FixedHot("A"), hot_a)):
            llm.engine.core.policy = policy
            before = dict(llm.engine.core.stats().mode_steps)
            outs = llm.generate([prompts[i] for i in which], params, [loras[i] for i in which], use_tqdm=False)
            assert llm.engine.core.stats().mode_steps[mode] > before[mode]
            out[mode] = [o.outputs[0] for o in outs]
        return out
    finally:
        llm.engine.core.shutdown()


def test_two_ranks_equal_one(family, tiny_model, adapters):
    one = _run(tiny_model, adapters, family, 1)
    two = _run(tiny_model, adapters, family, 2)
    for mode in one:
        for got, want in zip(two[mode], one[mode]):
            assert got.token_ids == want.token_ids, mode
            for lp, ref in zip(got.logprobs, want.logprobs):
                for tok, value in ref.items():
                    assert lp[tok] == pytest.approx(value, abs=1e-4)
