"""Structured outputs in the engine: every constrained output parses and validates (adapters mixed in one batch),
choices and regexes hold, free requests in the same batch are untouched, bad grammars are refused up front."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tests.conftest import LM_LINEARS
from valora import LLM, LoRARequest, SamplingParams
from valora.engine.sampler import sample
from valora.engine.sequence import Sequence
from valora.engine.structured_outputs import GrammarCompiler, apply_bitmasks
from valora.multimodal.inputs import InputError, ProcessedPrompt
from valora.sampling_params import StructuredOutputsParams

pytestmark = pytest.mark.families("qwen2_vl")

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["car", "person", "bicycle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 50},
        "box": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 4,
                "maxItems": 4},
        "note": {"type": "string", "maxLength": 12},
    },
    "required": ["label", "count", "box", "note"],
    "additionalProperties": False,
}


def _json(schema=SCHEMA, **kw) -> StructuredOutputsParams:
    return StructuredOutputsParams(json=schema, disable_any_whitespace=True, **kw)


@pytest.fixture(scope="module")
def llm(tiny_model, adapter_factory):
    llm = LLM(str(tiny_model), enable_lora=True, max_loras=2, max_lora_rank=16, dtype="float32", device="cpu",
              max_num_seqs=16)
    llm.adapters = [LoRARequest(f"a{i}", i + 1, str(adapter_factory(tiny_model, r=8, seed=300 + i,
                                                                      target_modules=list(LM_LINEARS[:4]))))
                    for i in range(3)]
    return llm


def test_json_schema_outputs_validate_with_adapters_mixed_in_a_batch(llm):
    prompts = [f"frame {i}: what is there?" for i in range(12)]
    loras = [None if i % 4 == 3 else llm.adapters[i % 3] for i in range(12)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=96, structured_outputs=_json()) for i in range(12)]
    outs = llm.generate(prompts, params, loras, use_tqdm=False)
    assert {o.lora_name for o in outs} == {None, "a0", "a1", "a2"}
    for o in outs:
        c = o.outputs[0]
        assert c.finish_reason == "stop", c.text  # ended by its grammar, not by max_tokens
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_json_object_choice_and_regex(llm):
    choices = ["left", "right", "straight ahead"]
    params = [
        SamplingParams(temperature=1.0, seed=1, max_tokens=64, n=2,
                       structured_outputs=StructuredOutputsParams(json_object=True, disable_any_whitespace=True)),
        SamplingParams(temperature=1.0, seed=2, max_tokens=16, n=4, structured_outputs=StructuredOutputsParams(
            choice=choices)),
        SamplingParams(temperature=1.0, seed=3, max_tokens=32,
                       structured_outputs=StructuredOutputsParams(regex=r"[A-Z]{2}-[0-9]{3}")),
    ]
    outs = llm.generate(["a", "b", "c"], params, [llm.adapters[0], None, llm.adapters[1]], use_tqdm=False)
    for c in outs[0].outputs:
        assert isinstance(json.loads(c.text), dict), c.text
    assert all(c.text in choices for c in outs[1].outputs)
    assert re.fullmatch(r"[A-Z]{2}-[0-9]{3}", outs[2].outputs[0].text)


def test_free_requests_in_a_constrained_batch_are_untouched(llm):
    free = SamplingParams(temperature=0.7, seed=5, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)
    alone = llm.generate(["a quick fox"], free, [llm.adapters[2]], use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(
        ["x", "a quick fox", "y"],
        [SamplingParams(temperature=1.0, max_tokens=40, structured_outputs=_json()), free,
         SamplingParams(temperature=0, max_tokens=8, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))],
        [llm.adapters[0], llm.adapters[2], None], use_tqdm=False)
    assert mixed[1].outputs[0].token_ids == alone


@pytest.mark.parametrize("spec, message", [
    (dict(regex="[a-"), "regex"),
    (dict(grammar="start: foo\n"), "foo"),
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "nonsense"),
])
def test_bad_grammars_are_refused_when_added(llm, spec, message):
    with pytest.raises(InputError, match=message):
        llm.engine.add_request("bad", "hello", SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    assert "bad" not in llm.engine.output_processor.requests and not llm.engine.core.requests


@pytest.mark.parametrize("spec", [dict(), dict(regex="a", choice=["a"]), dict(choice=[])])
def test_params_take_exactly_one_spec(spec):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**spec)


def test_compiled_grammars_are_cached_and_matchers_independent(llm):
    compiler = GrammarCompiler(llm.get_tokenizer(), llm.engine.core.model.decoder_config.vocab_size, [0])
    a = compiler.compile(StructuredOutputsParams(choice=["yes", "no"]))
    b = compiler.compile(StructuredOutputsParams(choice=["yes", "no"]))
    assert len(compiler._compiled) == 1 and a is not b
    yes = llm.get_tokenizer().encode("yes")
    assert a.consume_tokens(yes) and not b.is_stopped()  # b is at the start still


def test_bitmask_masks_exactly_the_disallowed_tokens():
    x = torch.randn(3, 70)
    masks = torch.zeros(2, 3, dtype=torch.int32)
    allowed = {0: [0, 5, 31, 32, 69], 2: [1, 40]}
    for j, toks in enumerate(allowed.values()):
        for t in toks:
            masks[j, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)  # bit 31 makes the word negative
    out = x.clone()
    apply_bitmasks(out, torch.tensor(list(allowed)), masks)
    for row, toks in allowed.items():
        assert torch.isfinite(out[row]).nonzero().flatten().tolist() == toks
        assert torch.equal(out[row, toks], x[row, toks])
    assert torch.equal(out[1], x[1])


def test_sampler_follows_the_grammar_under_any_temperature(llm):
    tok = llm.get_tokenizer()
    vocab = llm.engine.core.model.decoder_config.vocab_size
    seqs = []
    for i, temperature in enumerate([0.0, 1.0, 2.0]):
        seq = Sequence(i, f"r{i}", 0, ProcessedPrompt([1]), SamplingParams(temperature=temperature), None, 0.0)
        seq.grammar = llm.engine.core.grammars.compile(StructuredOutputsParams(regex=r"(ab|cd)+e"))
        seqs.append(seq)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        live = [s for s in seqs if not s.grammar.is_stopped()]
        if not live:
            break
        for s, t in zip(live, sample(torch.randn(len(live), vocab, generator=gen) * 5, live, [set()] * len(live))):
            assert s.grammar.consume_token(t)
            s.output_ids.append(t)
    for s in seqs:
        assert s.grammar.is_stopped() and re.fullmatch(r"(ab|cd)+e", tok.decode(s.output_ids))
