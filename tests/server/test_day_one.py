"""Acceptance 2 of issue 22, through the official `openai` client against `valora serve`: logprobs (chat and
completions, streamed and not), the three penalties, `echo`, structured outputs (OpenAI's `response_format` with a
JSON schema validated by `jsonschema`, vLLM's `guided_choice` / `guided_regex` / `structured_outputs`), `/tokenize`
round trips, `/detokenize`, `/version`, `/ping`, and adapters loaded on first use from `--lora-root`."""

from __future__ import annotations

import json
import math
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest

from tests.server.process import SERVED

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["car", "person", "bicycle"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 20},
        "note": {"type": "string", "maxLength": 10},
    },
    "required": ["label", "count", "note"],
    "additionalProperties": False,
}
COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}


@pytest.fixture(scope="module")
def lora_root(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-root")
    for name in ("lora1", "lora2"):
        shutil.copytree(adapters[name], root / f"lazy-{name}")
    return root


@pytest.fixture(scope="module")
def server(start_server, adapters, lora_root):
    return start_server(["--lora-modules", f"lora0={adapters['lora0']}", "--lora-root", str(lora_root),
                         "--enable-lora-resolver", "--num-kv-blocks", "512"])


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_logprobs_are_log_probabilities_with_top_alternatives(client):
    out = client.chat.completions.create(model="lora0", messages=_user("name a colour"), max_tokens=6,
                                         temperature=0, logprobs=True, top_logprobs=3,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True) and math.isclose(entry.logprob, tops[0])  # greedy: the best
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    assert "".join(e.token for e in content) == out.choices[0].message.content

    stream = client.chat.completions.create(model="lora0", messages=_user("name a colour"), max_tokens=6,
                                            temperature=0, logprobs=True, top_logprobs=3, stream=True,
                                            extra_body={"ignore_eos": True})
    streamed = [e for chunk in stream if chunk.choices and chunk.choices[0].logprobs
                for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]


def test_completion_logprobs_and_echo(client):
    out = client.completions.create(model=SERVED, prompt="a red car", max_tokens=5, temperature=0, logprobs=2,
                                    echo=True, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text.startswith("a red car")
    prompt_tokens = out.usage.prompt_tokens
    assert len(lp.tokens) == prompt_tokens + 5 and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[:prompt_tokens] == [None] * prompt_tokens  # prompt logprobs are not computed
    assert all(v <= 0 for v in lp.token_logprobs[prompt_tokens:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[prompt_tokens:])  # top 2 plus the chosen token

    plain = client.completions.create(model=SERVED, prompt="a red car", max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert choice.text == "a red car" + plain.choices[0].text and plain.choices[0].logprobs is None


def test_penalties_change_greedy_output_and_are_range_checked(client):
    def tokens(**extra) -> list[str]:
        out = client.completions.create(model=SERVED, prompt="the the the", max_tokens=16, temperature=0,
                                        logprobs=0, extra_body={"ignore_eos": True, **extra})
        return out.choices[0].logprobs.tokens

    base = tokens()
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0}):
        assert tokens(**extra) != base, extra
    assert len(set(tokens(repetition_penalty=100.0))) > len(set(base))  # repeats are pushed out
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.completions.create(model=SERVED, prompt="x", presence_penalty=3.0)


def test_logit_bias_as_openai_takes_it(client):
    """OpenAI's `logit_bias` (token ids as string keys, values in [-100, 100]): +100 all but forces a token,
    through the official client's own parameter, on chat and completions; what OpenAI refuses is a 400."""
    chat = client.chat.completions.create(model=SERVED, messages=_user("hello"), max_tokens=5, temperature=0.7,
                                          logit_bias={"17": 100}, extra_body={"ignore_eos": True}, logprobs=True)
    assert {t.token for t in chat.choices[0].logprobs.content} == {client_token(client, 17)}
    out = client.completions.create(model=SERVED, prompt="a red car", max_tokens=4, temperature=0,
                                    logit_bias={"17": 100, "18": -100}, extra_body={"ignore_eos": True})
    assert out.choices[0].text == client_token(client, 17) * 4
    for bias, message in (({"17": 101}, r"\[-100, 100\]"), ({"x": 1}, "token ids"), ({"99999999": 1}, "vocabulary")):
        with pytest.raises(openai.BadRequestError, match=message):
            client.completions.create(model=SERVED, prompt="x", max_tokens=2, logit_bias=bias)


def client_token(client, token_id: int) -> str:
    import httpx

    r = httpx.post(f"{client.base_url}".removesuffix("/v1/") + "/detokenize", json={"model": SERVED,
                                                                                   "tokens": [token_id]})
    return r.json()["prompt"]


def test_response_format_json_schema_validates_across_adapters(client):
    def ask(i: int) -> str:
        out = client.chat.completions.create(
            model=["lora0", SERVED, "lazy-lora1"][i % 3], messages=_user(f"frame {i}: what is there?"),
            max_tokens=80, temperature=1.0, seed=i, extra_body=COMPACT,  # a random model: no endless spaces
            response_format={"type": "json_schema", "json_schema": {"name": "detection", "schema": SCHEMA,
                                                                    "strict": True}})
        assert out.choices[0].finish_reason == "stop"
        return out.choices[0].message.content

    with ThreadPoolExecutor(6) as pool:  # one batch, adapters mixed
        texts = list(pool.map(ask, range(6)))
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_guided_choice_regex_and_structured_outputs(client):
    choices = ["cat", "dog", "traffic light"]
    out = client.chat.completions.create(model="lora0", messages=_user("which?"), max_tokens=10, n=4,
                                         temperature=1.0, seed=3, extra_body={"guided_choice": choices})
    assert all(c.message.content in choices for c in out.choices)
    out = client.completions.create(model=SERVED, prompt="plate:", max_tokens=12, temperature=1.0,
                                    extra_body={"guided_regex": "[A-Z]{2}-[0-9]{2}"})
    assert re.fullmatch("[A-Z]{2}-[0-9]{2}", out.choices[0].text)
    out = client.chat.completions.create(model=SERVED, messages=_user("json"), max_tokens=40, temperature=1.0,
                                         extra_body={"structured_outputs": {"json_object": True,
                                                                            "disable_any_whitespace": True}})
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    stream = client.chat.completions.create(model="lora0", messages=_user("which?"), max_tokens=10, stream=True,
                                            extra_body={"guided_choice": choices})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in choices


@pytest.mark.parametrize("body, message", [
    ({"guided_regex": "[a-"}, "regex"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "exactly one"),
    ({"response_format": {"type": "json_schema"}}, "json_schema"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "one way"),
    ({"structured_outputs": {"jsn": {}}}, "jsn"),
])
def test_bad_structured_outputs_are_400(client, body, message):
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model=SERVED, messages=_user("x"), max_tokens=4, extra_body=body)


def test_continue_final_message_prefills_the_answer(server, client):
    """vLLM's `continue_final_message`: the prompt ends inside the last (assistant) message, with no end of turn,
    so the model continues it; together with `add_generation_prompt` it is a 400."""
    conv = [*_user("what is in the picture?"), {"role": "assistant", "content": "The picture shows"}]
    flags = {"continue_final_message": True, "add_generation_prompt": False}

    def tokenize(**extra) -> list[int]:
        r = httpx.post(f"{server.url}/tokenize", json={"model": SERVED, "messages": conv, **extra})
        assert r.status_code == 200, r.text
        return r.json()["tokens"]

    open_ids, closed_ids = tokenize(**flags), tokenize(add_generation_prompt=False)
    assert len(open_ids) < len(closed_ids) and closed_ids[:len(open_ids)] == open_ids  # the turn left open
    text = httpx.post(f"{server.url}/detokenize", json={"model": SERVED, "tokens": open_ids}).json()["prompt"]
    assert text.endswith("The picture shows")
    out = client.chat.completions.create(model="lora0", messages=conv, max_tokens=2, extra_body=flags)
    assert out.usage.prompt_tokens == len(open_ids)
    with pytest.raises(openai.BadRequestError, match="cannot both be true"):
        client.chat.completions.create(model=SERVED, messages=conv, max_tokens=2,
                                       extra_body={"continue_final_message": True})


TOOL = {"type": "function", "function": {"name": "count_cars", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize("kind, kwargs, message", [
    ("chat", {"tools": [TOOL]}, "tool calling is not supported"),  # tool_choice "auto" by default
    ("chat", {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "count_cars"}}},
     "tool calling"),
    ("chat", {"tool_choice": "required"}, "tool calling"),
    ("chat", {"extra_body": {"functions": [TOOL["function"]]}}, "function_call"),
    ("chat", {"messages": [*_user("hi"), {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "count_cars", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}]}, "tool calling"),
    ("chat", {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "text only"),
    ("completion", {"suffix": " the end"}, "suffix"),
    ("completion", {"best_of": 3, "n": 2}, "best_of"),
])
def test_options_this_server_cannot_honour_are_refused(client, kind, kwargs, message):
    """Options that would change the answer are a 400 naming them, never silently ignored (a client would take
    the answer for one that honoured them)."""
    with pytest.raises(openai.BadRequestError, match=message):
        if kind == "chat":
            client.chat.completions.create(**{"model": SERVED, "messages": _user("x"), "max_tokens": 2, **kwargs})
        else:
            client.completions.create(**{"model": SERVED, "prompt": "x", "max_tokens": 2, **kwargs})


def test_tools_that_must_not_be_called_and_best_of_n_are_served(client):
    out = client.chat.completions.create(model=SERVED, messages=_user("x"), max_tokens=2, tools=[TOOL],
                                         tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].finish_reason == "length"
    out = client.completions.create(model=SERVED, prompt="x", max_tokens=2, n=2, best_of=2)
    assert len(out.choices) == 2


def test_ignored_fields_are_logged_once_by_name(server, client):
    for _ in range(2):
        client.chat.completions.create(model=SERVED, messages=_user("x"), max_tokens=1, user="u-1",
                                       extra_body={"frobnicate_level": 3})
    log = server.log_text()
    assert log.count("frobnicate_level") == 1 and "fields ignored (not used by this server)" in log


def test_tokenize_round_trip_detokenize_version_ping(server, client):
    url = server.url
    text = "a dog runs across green grass"
    tok = httpx.post(f"{url}/tokenize", json={"model": SERVED, "prompt": text}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] > 0
    assert httpx.post(f"{url}/detokenize", json={"model": SERVED, "tokens": tok["tokens"]}).json() == {"prompt": text}
    out = client.completions.create(model=SERVED, prompt=tok["tokens"], max_tokens=1)
    assert out.usage.prompt_tokens == tok["count"]  # what /tokenize says is what the engine sees
    chat = httpx.post(f"{url}/tokenize", json={"model": "lora0", "messages": _user(text),
                                                "return_token_strs": True}).json()
    done = client.chat.completions.create(model="lora0", messages=_user(text), max_tokens=1)
    assert chat["count"] == done.usage.prompt_tokens and len(chat["token_strs"]) == chat["count"]
    assert httpx.post(f"{url}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.get(f"{url}/version").json()["version"]
    assert httpx.get(f"{url}/ping").status_code == 200 and httpx.post(f"{url}/ping").status_code == 200


def test_adapters_on_first_use(server, client):
    names = {m.id for m in client.models.list().data}
    assert "lazy-lora2" not in names

    def ask(_) -> str:
        return client.chat.completions.create(model="lazy-lora2", messages=_user("hi"), max_tokens=3,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:  # concurrent first requests: one load, the same answers
        answers = set(pool.map(ask, range(4)))
    assert len(answers) == 1 and "lazy-lora2" in {m.id for m in client.models.list().data}
    assert server.log_text().count("adapter lazy-lora2 loaded") == 1
    for bad in ("../lora0", "lazy-lora2/..", "missing-adapter", "a/b"):
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=bad, messages=_user("hi"), max_tokens=1)
