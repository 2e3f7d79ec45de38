"""Acceptance: bad input gets a clear error naming the problem, and the engine keeps serving the other requests."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from valora import LoRARequest, SamplingParams
from valora.config import EngineConfig, LoRAConfig
from valora.engine.llm_engine import LLMEngine
from valora.testing.checkpoints import peft_target_regex
from valora.testing.images import random_image

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(tiny_model):
    return LLMEngine(EngineConfig(model=str(tiny_model), dtype="float32", device="cpu", enable_lora=True,
                                  max_model_len=256, lora=LoRAConfig(max_loras=2, max_lora_rank=8)))


@pytest.fixture(scope="module")
def good_adapter(tiny_model, adapter_factory):
    return adapter_factory(tiny_model, r=4, target_modules=peft_target_regex(["q_proj", "v_proj"]), seed=7)


def _copy(src, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _broken_copies(tmp_path, good):
    """Damaged copies of a good adapter: name -> (adapter dir, a fragment the error must contain)."""
    cases = {"missing": (tmp_path / "does-not-exist", "directory not found")}
    d = _copy(good, tmp_path, "no-config")
    (d / "adapter_config.json").unlink()
    cases["no-config"] = (d, "no adapter_config.json")
    d = _copy(good, tmp_path, "corrupt-config")
    (d / "adapter_config.json").write_text("{ not json")
    cases["corrupt-config"] = (d, "corrupt adapter_config.json")
    d = _copy(good, tmp_path, "corrupt-weights")
    (d / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    cases["corrupt-weights"] = (d, "corrupt adapter weights")
    d = _copy(good, tmp_path, "no-weights")
    (d / "adapter_model.safetensors").unlink()
    cases["no-weights"] = (d, "neither adapter_model.safetensors")
    d = _copy(good, tmp_path, "unknown-target")
    tensors = load_file(d / "adapter_model.safetensors")
    renamed = {k.replace("q_proj", "foo_proj"): v for k, v in tensors.items()}
    save_file(renamed, d / "adapter_model.safetensors")
    cases["unknown-target"] = (d, "foo_proj")
    d = _copy(good, tmp_path, "dora")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    cases["dora"] = (d, "DoRA is not supported")
    return cases


def test_bad_adapters_are_refused_and_serving_continues(engine, family, tiny_model, good_adapter, model_factory,
                                                        adapter_factory, tmp_path):
    cases = _broken_copies(tmp_path, good_adapter)
    # real PEFT adapters that this model cannot take
    cases["rank-too-high"] = (adapter_factory(tiny_model, r=16, target_modules=["q_proj"]), "exceeds max_lora_rank=8")
    other_base = model_factory(family.name, hidden_size=96, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=2)
    cases["other-base"] = (adapter_factory(other_base, r=4, target_modules=["q_proj"]), "another base model")
    cases["lm-head"] = (adapter_factory(tiny_model, r=4, target_modules=["lm_head"]), "lm_head")

    engine.add_request("keep-1", "a red car parks", PARAMS, LoRARequest("good", 1, str(good_adapter)))
    engine.add_request("keep-2", "the quick brown fox", PARAMS)
    engine.step()
    for i, (name, (path, fragment)) in enumerate(cases.items()):
        with pytest.raises(ValueError, match=fragment):
            engine.add_request(f"bad-{name}", "hello", PARAMS, LoRARequest(name, 100 + i, str(path)))
        assert name not in engine.list_loras()
    outputs = _drain(engine)
    assert set(outputs) == {"keep-1", "keep-2"}
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs.values())


def test_bad_prompts_are_refused_and_serving_continues(engine, family):
    img = family.image_prompt
    engine.add_request("keep", "a dog runs across green grass", PARAMS)
    engine.step()
    bad = {
        "too-long": ("word " * 400, "context length"),
        "unreadable-image": ({"prompt": f"{img} hi", "multi_modal_data": {"image": b"\x89PNG not an image"}},
                             "cannot read image"),
        "placeholder-mismatch": ({"prompt": "no placeholder", "multi_modal_data": {"image": random_image(32, 32)}},
                                 "0 image placeholders"),
        "too-many-images": ({"prompt": img * 9, "multi_modal_data": {"image": [random_image(32, 32)] * 9}},
                            "over the limit"),
        "empty": ("", "empty"),
        "token-out-of-vocab": ({"prompt_token_ids": [1, 2, 10**6]}, "prompt_token_ids"),
        "wrong-type": (42, "must be a string or a dict"),
        "bad-modality": ({"prompt": "x", "multi_modal_data": {"audio": b""}}, "unsupported multi_modal_data"),
    }
    for name, (prompt, fragment) in bad.items():
        with pytest.raises(ValueError, match=fragment):
            engine.add_request(f"bad-{name}", prompt, PARAMS)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("keep", "again", PARAMS)
    outputs = _drain(engine)
    assert set(outputs) == {"keep"} and outputs["keep"].outputs[0].finish_reason == "length"


def test_sampling_params_are_validated():
    for kwargs in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_tokens=0), dict(n=0),
                   dict(min_tokens=5, max_tokens=2), dict(logprobs=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**kwargs)


def _drain(engine):
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done
