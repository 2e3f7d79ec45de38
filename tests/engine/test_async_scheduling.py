"""Asynchronous scheduling (step n+1 launched before step n is collected, its new input tokens read on the device)
gives exactly the outputs of the synchronous loop: greedy and seeded sampling, stop tokens and EOS found one step
late, stop strings, max_tokens and the context length, min_tokens, penalties, logprobs, n > 1, adapters and images,
chunked prefill, preemption, and structured outputs (their sampler deferred until the grammars advance); task
heads: tests/heads/test_engine.py."""

from __future__ import annotations

import pytest

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.orchestrator.step_log import read_step_log
from valora.sampling_params import StructuredOutputsParams
from valora.testing.images import random_image

pytestmark = pytest.mark.families("qwen2_vl")


def _completions(outputs) -> list:
    """What must not change: tokens, text and ends exactly; logprobs to float rounding (a step launched ahead holds
    the rows that end one step late, and another row count may round a logit's last bit differently)."""
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              [{t: round(v, 4) for t, v in d.items()} for d in c.logprobs] if c.logprobs else None)
             for c in o.outputs] for o in outputs]


def _run(model, prompts, params, loras=None, **kw) -> tuple[dict, object]:
    outs = {}
    for on in (False, True):
        llm = LLM(str(model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
                  async_scheduling=on, scheduler="slora", **kw)
        outs[on] = _completions(llm.generate(prompts, params, loras, use_tqdm=False))
        core = llm.engine.core
        assert (core.num_steps_ahead > 0) == on
        assert core.blocks.num_free == core.blocks.num_blocks and not core.requests  # nothing left behind
    return outs, core


def test_same_outputs_as_the_synchronous_loop(family, tiny_model, adapter_factory) -> None:
    adapter = adapter_factory(tiny_model, r=8, target_modules=family.targets("lm", LM_LINEARS), seed=3)
    lora = LoRARequest("ad", 1, str(adapter))
    prompts, loras, params = [], [], []
    for i in range(12):
        text = "a red car parks near a tall building " * (1 + i % 3)
        image = {"image": random_image(56, 56, seed=i)}
        prompts.append({"prompt": f"{family.image_prompt} {text}", "multi_modal_data": image} if i % 3 == 0 else text)
        loras.append(lora if i % 2 else None)
    # Stop ids and strings that will hit: from the greedy tokens and text of each prompt.
    probe = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=8, dtype="float32", device="cpu",
                max_model_len=48).generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                           loras, use_tqdm=False)
    for i, o in enumerate(probe):
        ids, text = o.outputs[0].token_ids, o.outputs[0].text
        params.append(SamplingParams(
            temperature=0.9 if i % 4 == 1 else 0, seed=i, top_k=40, max_tokens=4 + 3 * (i % 5), n=2 if i == 5 else 1,
            ignore_eos=i % 3 == 2, min_tokens=3 if i == 4 else 0, logprobs=2 if i % 5 == 0 else None,
            presence_penalty=0.5 if i == 7 else 0.0, repetition_penalty=1.3 if i == 8 else 1.0,
            stop_token_ids=[ids[min(len(ids) - 1, 1 + i % 3)]] if i % 4 in (0, 3) and ids else None,
            stop=[text[len(text) // 2 : len(text) // 2 + 2]] if i in (2, 6) and text.strip() else None))
    outs, _ = _run(tiny_model, prompts, params, loras, max_model_len=48)  # the longest prompts end by length
    assert outs[True] == outs[False]
    reasons = {c[2] for o in outs[False] for c in o}
    assert {"length", "stop"} <= reasons


def test_same_outputs_with_chunked_prefill_and_preemption(family, tiny_model) -> None:
    prompts = ["describe the scene : a red car parks near a tall building " * (1 + i % 3) for i in range(8)]
    params = [SamplingParams(temperature=0.8 if i % 2 else 0, seed=i, max_tokens=24, ignore_eos=True)
              for i in range(8)]
    outs, core = _run(tiny_model, prompts, params, block_size=8, num_kv_blocks=20, max_num_batched_tokens=40)
    assert core.stats().num_preemptions > 0
    assert outs[True] == outs[False]


def test_structured_outputs_go_ahead_with_their_sampler_deferred(tiny_model, monkeypatch) -> None:
    """Rows that follow a grammar need their last token on the host for the next bitmask: a step holding one is
    launched ahead with only its model pass queued, its sampler queued once the step before is collected (the
    grammars advanced). Tokens equal the synchronous loop's, greedy and seeded, free rows beside constrained ones,
    and grammars that end while the next step is in flight (the choice's rows finish early)."""
    from valora.engine.model_runner import ModelRunner

    deferred = []
    launch = ModelRunner.launch

    def recorded(self, *args, defer_sampling=False, **kw):
        deferred.append(defer_sampling)
        return launch(self, *args, defer_sampling=defer_sampling, **kw)

    monkeypatch.setattr(ModelRunner, "launch", recorded)
    choice = StructuredOutputsParams(choice=["cat", "dog", "a bird"])
    regex = StructuredOutputsParams(regex=r"(yes|no), [a-z]{2,6}\.")
    prompts = [f"question {i}: which animal?" for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=12, structured_outputs=choice),
              SamplingParams(temperature=0.9, seed=5, max_tokens=14, structured_outputs=choice),
              SamplingParams(temperature=0, max_tokens=16, structured_outputs=regex),
              SamplingParams(temperature=0.8, seed=7, max_tokens=16, structured_outputs=regex),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=3, max_tokens=9, ignore_eos=True)]
    outs, _ = _run(tiny_model, prompts, params)
    assert outs[True] == outs[False]
    assert all(o[0][1] in ("cat", "dog", "a bird") for o in outs[True][:2])
    assert all(o[0][1].startswith(("yes, ", "no, ")) for o in outs[True][2:4])
    assert any(deferred)  # the constrained steps went ahead


def test_a_step_launched_ahead_is_charged_its_own_switch(tiny_model, adapter_factory, tmp_path) -> None:
    """A step launched ahead merges its adapter while the step before it is in flight: the policy's record of each
    step holds its own switch (the cost model learns from the time left), not the next step's."""
    adapter = adapter_factory(tiny_model, r=8, target_modules=LM_LINEARS, seed=5)
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=1, max_lora_rank=8, dtype="float32", device="cpu",
              step_log=str(tmp_path / "steps.jsonl"))
    lora = LoRARequest("ad", 1, str(adapter))
    llm.generate([f"tell me about {i}" for i in range(4)],
                 [SamplingParams(temperature=0, max_tokens=2 + 4 * i, ignore_eos=True) for i in range(4)],
                 [None, None, lora, lora], use_tqdm=False)
    records = read_step_log(tmp_path / "steps.jsonl")
    assert llm.engine.core.num_steps_ahead and any(r.switch_s for r in records)
    assert all(r.duration_s >= r.switch_s for r in records)
