"""Acceptance (orchestrator 1): switching among merged(A), merged(B) and unmerged leaves the checkpoint weights
bit-identical after any number of switches, and every mode computes the same outputs as unmerged."""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.orchestrator.policy import Decision, Policy, SchedulerView
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image


class FixedHot(Policy):
    """Keeps one adapter merged whatever the queues hold (None: always unmerged)."""

    name = "fixed"
    merges = True

    def __init__(self, hot: str | None) -> None:
        self.hot = hot

    def decide(self, view: SchedulerView) -> Decision:
        return Decision(hot=self.hot)


@pytest.fixture(scope="module")
def adapters(family, tiny_model, adapter_factory):
    vision = "|".join([family.targets("vision"), family.targets("projector"),
                       family.targets("lm", ("q_proj", "v_proj", "gate_proj"))])
    return {
        "A": adapter_factory(tiny_model, r=8, target_modules=peft_target_regex(LM_LINEARS), seed=21),
        "B": adapter_factory(tiny_model, r=4, lora_alpha=16, seed=22, target_modules=vision),
        "C": adapter_factory(tiny_model, r=16, use_rslora=True, target_modules=["up_proj", "o_proj"], seed=23),
    }


def _llm(tiny_model, device: str = "cpu"):
    return LLM(str(tiny_model), enable_lora=True, max_loras=4, max_lora_rank=16, dtype="float32", device=device)


@pytest.mark.families("qwen2_vl")  # weight bookkeeping only: the same for every family
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])])
def test_thousand_switches_leave_weights_bit_identical(tiny_model, adapters, device):
    """On CUDA repeated merges replay captured graphs (modes.py): they too must leave W alone and write W'."""
    llm = _llm(tiny_model, device)
    engine = llm.engine.core
    for i, name in enumerate(("A", "B")):
        engine.add_lora(LoRARequest(name, i + 1, str(adapters[name])))
    slots = engine.lora_manager.activate(["A", "B"])
    layers = engine.lora_manager.layers
    pristine = {p: layer.weight.detach().clone() for p, layer in layers.items()}
    rng = random.Random(0)
    switcher = engine.switcher
    for i in range(1000):
        target = rng.choice(["A", "B", None])
        switcher.switch(target, slots.get(target))
        if i % 100 == 99:
            assert all(torch.equal(layer.weight, pristine[p]) for p, layer in layers.items())
    # the shadow weights hold exactly W + s·B·A of the adapter last merged
    switcher.switch("A", slots["A"])
    qkv = layers["model.language_model.layers.1.self_attn.qkv_proj"]
    a = engine.lora_manager.adapter("A")
    a_q, b_q = (t.to(device) for t in a.weights[("model.language_model.layers.1.self_attn.qkv_proj", 0)])
    expected = pristine["model.language_model.layers.1.self_attn.qkv_proj"][: b_q.shape[0]] + a.scaling * b_q @ a_q
    # the GPU's fp32 dot rounds its inputs to tf32
    assert torch.allclose(qkv.merged_weight[: b_q.shape[0]], expected, atol=1e-6 if device == "cpu" else 1e-3)
    assert switcher.num_switches > 600
    assert sorted(switcher._graphs) == ([] if device == "cpu" else sorted(slots.values()))


@pytest.mark.families("qwen2_vl")
def test_only_a_merge_waits_for_the_device(tiny_model, adapters, monkeypatch):
    """Unmerging and re-merging the adapter the shadow weights hold flip pointers: they must not wait for the step
    in flight (on a GPU a synchronize there drained the asynchronous pipeline every time the policy flipped)."""
    llm = _llm(tiny_model)
    engine = llm.engine.core
    for i, name in enumerate(("A", "B")):
        engine.add_lora(LoRARequest(name, i + 1, str(adapters[name])))
    slots = engine.lora_manager.activate(["A", "B"])
    switcher, manager = engine.switcher, engine.lora_manager
    switcher.switch("A", slots["A"])
    waits = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waits.append(device))
    monkeypatch.setattr(manager, "device", torch.device("cuda"))  # only the wait is looked at: no CUDA work runs
    for target in (None, "A", None, "A"):
        switcher.switch(target, slots.get(target))
        assert not switcher.rewrote
    assert waits == [] and switcher.hot == "A"
    monkeypatch.setattr(manager, "device", torch.device("cpu"))
    switcher.switch("B", slots["B"])  # a merge (on the CPU here) rewrites the shadow weights
    assert switcher.held == "B" and switcher.rewrote


@pytest.mark.parametrize("hot", ["A", "B"])
def test_every_mode_matches_unmerged(family, tiny_model, adapters, hot):
    img = family.image_prompt
    cases = [("a red car", "A"), (f"{img} what digit ?", "B"), ("the quick fox", None), (f"{img} caption", "C"),
             ("hello world", "A"), (f"{img} count", None)]
    prompts = [{"prompt": p, "multi_modal_data": {"image": [random_image(56, 70, seed=i)] if img in p else []}}
               for i, (p, _) in enumerate(cases)]
    loras = [LoRARequest(a, ord(a), str(adapters[a])) if a else None for _, a in cases]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)

    def run(policy: Policy, which: list[int]):
        llm = _llm(tiny_model)
        llm.engine.core.policy = policy
        outs = llm.generate([prompts[i] for i in which], params, [loras[i] for i in which], use_tqdm=False)
        return outs, llm.engine.core.stats()

    everyone = list(range(len(cases)))
    unmerged, _ = run(FixedHot(None), everyone)
    mixture, stats = run(FixedHot(hot), everyone)
    assert stats.mode_steps["mixture"] > 0 and stats.mode_steps["unmerged"] == 0
    only_hot = [i for i, (_, a) in enumerate(cases) if a == hot]
    merged, merged_stats = run(FixedHot(hot), only_hot)
    assert merged_stats.mode_steps["merged"] > 0 and merged_stats.mode_steps["mixture"] == 0
    for got, i in [*zip(mixture, everyone), *zip(merged, only_hot)]:
        want = unmerged[i].outputs[0]
        assert got.outputs[0].token_ids == want.token_ids
        for lp, ref in zip(got.outputs[0].logprobs, want.logprobs):
            for tok, value in ref.items():
                assert lp[tok] == pytest.approx(value, abs=1e-4)
