"""Heads through the server: a chat to an adapter with a default head (or naming one with `head`) gets the
head's answer as the message content and its scores in `choices[i].head`; `POST /v1/classify` answers like
vLLM's classification API; both agree with the engine's own answer for the same image."""

from __future__ import annotations

import base64
import io

import httpx
import openai
import pytest

from valora import LLM, LoRARequest
from valora.heads import HeadParams
from valora.testing.images import random_image

pytestmark = pytest.mark.families("qwen2_vl")
QUESTION = "What is in the picture?"


def data_url(seed: int) -> str:
    buf = io.BytesIO()
    random_image(56, 56, seed=seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def messages(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(seed)}},
                                         {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def url(head_model, head_adapters):
    from valora.config import CacheConfig, EngineConfig, LoRAConfig
    from valora.server.app import ServerConfig
    from valora.server.launch import LocalServer

    engine = EngineConfig(model=str(head_model), device="cpu", enable_lora=True, lora=LoRAConfig(max_loras=3),
                          cache=CacheConfig(num_blocks=256))
    config = ServerConfig(served_model_names=["base"], lora_modules=[
        (name, str(path)) for name, path in head_adapters.items()])
    with LocalServer(engine, config, in_thread=True) as u:
        yield u


@pytest.fixture(scope="module")
def offline(head_model, head_adapters):
    """The engine's own head answers for seeds 0..3 (adapter `one`) and the box of `two` for seed 0."""
    llm = LLM(str(head_model), enable_lora=True, max_loras=2, num_kv_blocks=256, device="cpu")
    prompts = [llm.chat_prompt(messages(s)) for s in range(4)]
    one = llm.generate(prompts, HeadParams(), LoRARequest("one", 1, str(head_adapters["one"])), use_tqdm=False)
    two = llm.generate(prompts[:1], HeadParams("where"), LoRARequest("two", 2, str(head_adapters["two"])),
                       use_tqdm=False)
    return [o.outputs[0].head for o in one], two[0].outputs[0].head


def test_chat_to_an_adapter_with_a_default_head(url, offline):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for seed in range(4):
        r = client.chat.completions.create(model="one", messages=messages(seed), max_tokens=5)
        choice = r.choices[0]
        head = choice.model_extra["head"]
        assert choice.message.content == head["label"] == offline[0][seed].label
        assert head["scores"] == pytest.approx(offline[0][seed].scores, abs=1e-5)
        assert choice.finish_reason == "stop" and r.usage.completion_tokens == 0


def test_chat_names_a_head_or_decodes(url, offline):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="two", messages=messages(0), extra_body={"head": "where"})
    head = r.choices[0].model_extra["head"]
    assert head["box"] == pytest.approx(offline[1].box, abs=1e-5) and r.choices[0].message.content == head["label"]
    # No default head and none named: the adapter decodes text as usual.
    r = client.chat.completions.create(model="two", messages=messages(0), max_tokens=3, temperature=0)
    assert r.choices[0].model_extra["head"] is None and r.usage.completion_tokens > 0


def test_streamed_head_answer(url, offline):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="one", messages=messages(1), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == offline[0][1].label and finals[0].model_extra["head"]["label"] == text


def test_classify_endpoint(url, offline):
    r = httpx.post(f"{url}/v1/classify", json={"model": "one", "messages": messages(2)}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    item = body["data"][0]
    assert body["object"] == "list" and item["object"] == "classification" and item["head"] == "kind"
    assert item["label"] == offline[0][2].label and item["num_classes"] == 3
    assert dict(zip(item["labels"], item["probs"])) == pytest.approx(offline[0][2].scores, abs=1e-5)
    assert body["usage"]["completion_tokens"] == 0 and body["usage"]["prompt_tokens"] > 0
    r = httpx.post(f"{url}/v1/classify", json={"model": "two", "head": "where", "input": ["a", "b c"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and all(len(d["box"]) == 4 for d in r.json()["data"])


@pytest.mark.parametrize("body, status, code", [
    ({"model": "base", "input": "x"}, 400, "no_task_head"),
    ({"model": "plain", "input": "x"}, 400, "no_task_head"),
    ({"model": "two", "input": "x"}, 400, "invalid_head"),
    ({"model": "one", "head": "nope", "input": "x"}, 400, "invalid_head"),
    ({"model": "one"}, 400, "invalid_value"),
    ({"model": "one", "input": "x", "stream": True}, 400, "invalid_value"),
    ({"model": "nope", "input": "x"}, 404, "model_not_found"),
])
def test_classify_errors(url, body, status, code):
    r = httpx.post(f"{url}/v1/classify", json=body, timeout=60)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text


def test_chat_head_errors(url):
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "one", "messages": messages(0), "n": 2}, timeout=60)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "n")
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "plain", "messages": messages(0), "head": "kind"},
                   timeout=60)
    assert (r.status_code, r.json()["error"]["code"]) == (400, "no_task_head")
