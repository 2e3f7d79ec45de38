"""Acceptance 1 and 2: the real server, driven by the official `openai` client, answers every request exactly
as the offline engine does for the same greedy request, alone or 64 at once over 8 adapters and the base
model; afterwards the KV cache and adapter slots are idle again; a client that leaves has its request aborted."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.process import SERVED, gauge, series
from valora import LLM, LoRARequest, SamplingParams
from valora.multimodal.chat import image_data_url
from valora.multimodal.video import encode_video, video_data_url
from valora.testing.images import random_image

MAX_TOKENS = 12


def messages(i: int) -> list[dict]:
    """Request i of a mix: every other one carries an image (of varying size)."""
    text = {"type": "text", "text": f"Describe picture {i} please."}
    if i % 2:
        return [{"role": "user", "content": [text]}]
    image = {"type": "image_url", "image_url": {"url": image_data_url(random_image(56, 56 + 28 * (i % 3), seed=i))}}
    return [{"role": "user", "content": [image, text]}]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A folder the server may read images from, and one beside it that it may not."""
    root = tmp_path_factory.mktemp("media")
    (root / "allowed").mkdir()
    random_image(56, 84, seed=5).save(root / "allowed" / "cat.png")
    random_image(56, 84, seed=5).save(root / "secret.png")
    return root


@pytest.fixture(scope="module")
def server(start_server, adapters, media):
    modules = [f"{name}={path}" for name, path in adapters.items()]
    return start_server(["--lora-modules", *modules, "--max-loras", "4", "--num-kv-blocks", "1024",
                         "--max-model-len", "2048", "--allowed-local-media-path", str(media / "allowed")])


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(server_model, adapters):
    """The offline engine over the same model and adapters: one request at a time is the reference."""
    llm = LLM(str(server_model), enable_lora=True, max_loras=8, num_kv_blocks=1024, max_model_len=2048,
              device="cpu", dtype="float32")
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}

    def chat(model: str, msgs: list[dict], **params):
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **params)
        return llm.chat(msgs, sp, lora_request=loras.get(model), use_tqdm=False)[0]

    def complete(model: str, prompt: str, **params):
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, **params)
        return llm.generate(prompt, sp, lora_request=loras.get(model), use_tqdm=False)[0]

    chat.complete = complete
    chat.loras = loras
    return chat


def test_models_lists_base_and_adapters(client, adapters):
    cards = {m.id: m for m in client.models.list().data}
    assert set(cards) == {SERVED, *adapters}
    assert cards[SERVED].model_extra["parent"] is None
    for name, path in adapters.items():
        assert cards[name].model_extra["parent"] == SERVED
        assert cards[name].model_extra["root"] == str(path)


def test_chat_with_image_matches_offline_for_every_adapter(client, offline, adapters):
    for model in [SERVED, *adapters]:
        msgs = messages(0)
        want = offline(model, msgs)
        got = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == want.outputs[0].text, model
        assert got.choices[0].finish_reason == want.outputs[0].finish_reason
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == len(want.outputs[0].token_ids)
        assert got.model == model
    texts = {offline(m, messages(0)).outputs[0].text for m in [SERVED, *adapters]}
    assert len(texts) > 1  # the adapters change the answer, so the comparison above can tell them apart


def test_local_images_only_under_the_allowed_folder(client, media):
    def ask(url: str):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "What is it?"}]}]
        return client.chat.completions.create(model="lora1", messages=msgs, temperature=0, max_tokens=MAX_TOKENS)

    inline = ask(image_data_url(random_image(56, 84, seed=5))).choices[0].message.content
    assert ask(f"file://{media / 'allowed' / 'cat.png'}").choices[0].message.content == inline
    for outside in (media / "secret.png", media / "allowed" / ".." / "secret.png"):
        with pytest.raises(openai.BadRequestError) as e:
            ask(f"file://{outside}")
        assert e.value.code == "invalid_image" and "outside the allowed media folder" in e.value.message


def test_chat_with_video_matches_offline(client, offline, media):
    """video_url parts (a data: URL of an MP4, a WebM file under the allowed folder) with the server's default
    sampling and the request's own (media_io_kwargs), as the offline engine answers the same messages."""
    frames = [random_image(56, 84, seed=20 + i) for i in range(5)]
    (media / "allowed" / "clip.webm").write_bytes(encode_video(frames, fps=2, container="webm"))

    def msgs(url: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": "What happens?"}]}]

    for url in (video_data_url(frames, fps=2), f"file://{media / 'allowed' / 'clip.webm'}"):
        want = offline("lora4", msgs(url))
        got = client.chat.completions.create(model="lora4", messages=msgs(url), temperature=0, max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == want.outputs[0].text
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
    fewer = client.chat.completions.create(model="lora4", messages=msgs(video_data_url(frames, fps=2)), max_tokens=1,
                                           extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert fewer.usage.prompt_tokens < got.usage.prompt_tokens  # one temporal patch instead of three


def test_chat_streaming_equals_non_streaming(client, offline):
    msgs = messages(2)
    want = offline("lora4", msgs)  # an adapter on the vision tower and the LM
    stream = client.chat.completions.create(model="lora4", messages=msgs, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.outputs[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [want.outputs[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)
    assert chunks[-1].model_extra["metrics"]["queue_time"] >= 0


def test_continuous_usage_streams_every_token(client, offline):
    """vLLM's `continuous_usage_stats`: a chunk for every step that made tokens (even ones that add no text yet),
    each with the running usage, so a client can time the first token whatever it decodes to."""
    msgs = messages(3)
    want = offline("lora1", msgs)
    stream = client.chat.completions.create(model="lora1", messages=msgs, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True,
                                                                         "continuous_usage_stats": True})
    chunks = [c for c in stream if c.choices]
    counts = [c.usage.completion_tokens for c in chunks[1:]]  # after the role chunk
    # one chunk per step, unless the client reads slower than the engine steps (outputs are cumulative: the newest
    # one supersedes those not yet sent)
    assert counts == sorted(set(counts)) and counts[-1] == len(want.outputs[0].token_ids) and counts[0] >= 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.outputs[0].text


def test_completions_match_offline(client, offline):
    want = offline.complete("lora1", "Hello world")
    got = client.completions.create(model="lora1", prompt="Hello world", max_tokens=MAX_TOKENS, temperature=0)
    assert got.choices[0].text == want.outputs[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lora1", prompt="Hello world", max_tokens=MAX_TOKENS, temperature=0, stream=True) if c.choices)
    assert streamed == want.outputs[0].text
    both = client.completions.create(model=SERVED, prompt=["Hello world", "a red car"], max_tokens=MAX_TOKENS,
                                     temperature=0)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [offline.complete(SERVED, p).outputs[0].text
                                              for p in ["Hello world", "a red car"]]


def test_stop_strings_cut_the_text_in_both_modes(client, offline):
    full = offline.complete("lora2", "the quick brown fox").outputs[0].text
    stop = full[3:5]
    want = offline.complete("lora2", "the quick brown fox", stop=[stop]).outputs[0]
    assert want.text == full[: full.index(stop)] and want.finish_reason == "stop"
    got = client.completions.create(model="lora2", prompt="the quick brown fox", max_tokens=MAX_TOKENS,
                                    temperature=0, stop=[stop])
    assert (got.choices[0].text, got.choices[0].finish_reason) == (want.text, "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="lora2", prompt="the quick brown fox", max_tokens=MAX_TOKENS, temperature=0, stop=[stop],
        stream=True) if c.choices)
    assert streamed == want.text


def test_sampling_options_n_seed_and_vllm_extras(client):
    kw = dict(model="lora5", messages=messages(1), max_tokens=8, temperature=1.0, top_p=0.9, n=3, seed=7)
    first, again = (client.chat.completions.create(**kw) for _ in range(2))
    assert len(first.choices) == 3 and [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1  # n samples, not n copies
    long = client.chat.completions.create(model=SERVED, messages=messages(1), temperature=0, max_completion_tokens=20,
                                          extra_body={"ignore_eos": True, "min_tokens": 20})
    assert long.usage.completion_tokens == 20 and long.choices[0].finish_reason == "length"


def test_load_and_unload_at_run_time(server, client, offline, adapters):
    path = str(adapters["lora3"])
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path})
    assert r.status_code == 200, r.text
    cards = {m.id: m for m in client.models.list().data}
    assert cards["late"].model_extra["parent"] == SERVED
    got = client.chat.completions.create(model="late", messages=messages(4), temperature=0, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == offline("lora3", messages(4)).outputs[0].text
    r = httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": "late"})
    assert r.status_code == 200, r.text
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="late", messages=messages(4), max_tokens=2)


def test_64_concurrent_streams_over_8_adapters_and_base_match_offline(server, offline, adapters):
    models = [SERVED, *adapters]
    requests = [(models[i % len(models)], messages(i)) for i in range(64)]
    want = [offline(model, msgs).outputs[0] for model, msgs in requests]
    before = server.metrics()

    async def run() -> list[tuple[str, str | None]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(model: str, msgs: list[dict]) -> tuple[str, str | None]:
            stream = await aclient.chat.completions.create(model=model, messages=msgs, temperature=0,
                                                           max_tokens=MAX_TOKENS, stream=True)
            parts, finish = [], None
            async for chunk in stream:
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                    finish = chunk.choices[0].finish_reason or finish
            return "".join(parts), finish

        async with aclient:
            return await asyncio.gather(*(one(m, msgs) for m, msgs in requests))

    got = asyncio.run(run())
    assert got == [(w.text, w.finish_reason) for w in want]

    after = server.wait_idle()
    assert gauge(after, "valora:kv_cache_usage_perc") == 0.0
    assert gauge(after, "valora:lora_slots_active") == 0
    (info,) = series(after, "valora:lora_requests_info")
    assert 'running_lora_adapters=""' in info and 'waiting_lora_adapters=""' in info and 'max_lora="4"' in info
    assert f'model_name="{SERVED}"' in info  # as docs/server.md promises for every series
    evictions = series(after, "valora:lora_adapter_evictions_total")
    slot_evictions = next(v for k, v in evictions.items() if 'tier="slot"' in k)
    assert slot_evictions > 0  # 8 adapters through 4 slots, in one mixed batch stream
    done = gauge(after, "valora:e2e_request_latency_seconds_count") - gauge(before,
                                                                             "valora:e2e_request_latency_seconds_count")
    assert done == 64


def _abort_count(server) -> float:
    m = server.metrics()
    return sum(v for k, v in series(m, "valora:request_success_total").items() if 'finished_reason="abort"' in k)


def test_streaming_client_disconnect_aborts_and_frees_blocks(server):
    aborted, tokens = _abort_count(server), gauge(server.metrics(), "valora:generation_tokens_total")
    body = {"model": "lora6", "messages": messages(1), "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        chunks = [line for line, _ in zip((x for x in lines if x.startswith("data: {")), range(4))]
        assert len(chunks) == 4
        busy = server.metrics()
        assert gauge(busy, "valora:kv_cache_usage_perc") > 0 and gauge(busy, "valora:num_requests_running") == 1
    idle = server.wait_idle()
    assert gauge(idle, "valora:kv_cache_usage_perc") == 0.0
    assert _abort_count(server) == aborted + 1
    assert gauge(idle, "valora:generation_tokens_total") - tokens < 1500  # stopped early, not run to the end


def test_non_streaming_client_disconnect_aborts(server):
    aborted = _abort_count(server)
    body = {"model": SERVED, "messages": messages(1), "max_tokens": 1500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=0.5)
    server.wait_idle()
    assert _abort_count(server) == aborted + 1


def test_client_that_leaves_before_the_engine_has_its_request_is_counted(server):
    """Right after the first chunk (sent before the request reaches the engine) the client leaves: the request is
    aborted and counted, whether or not the engine had accepted it yet (issue 23: such aborts were not counted)."""
    aborted = _abort_count(server)
    body = {"model": SERVED, "messages": messages(1), "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert next(r.iter_lines()).startswith("data: {")
    deadline = time.monotonic() + 30
    while _abort_count(server) != aborted + 1:
        assert time.monotonic() < deadline, _abort_count(server) - aborted
        time.sleep(0.05)
    server.wait_idle()


def test_one_log_line_per_request_and_plain_routes(server, client):
    got = client.chat.completions.with_raw_response.create(model="lora0", messages=messages(3), max_tokens=4)
    body = got.parse()
    assert float(got.headers["x-queue-time"]) >= 0 and got.headers["x-request-id"] == body.id
    lines = [line for line in server.log_text().splitlines() if body.id in line]
    assert len(lines) == 1 and lines[0].startswith("INFO ") and "model=lora0" in lines[0]
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200
    metrics = httpx.get(f"{server.url}/metrics", follow_redirects=False)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("valora:time_to_first_token_seconds", "valora:time_per_output_token_seconds",
                 "valora:e2e_request_latency_seconds", "valora:num_requests_running", "valora:num_requests_waiting",
                 "valora:kv_cache_usage_perc", "valora:lora_requests_info", "valora:lora_adapter_loads_total",
                 "valora:lora_adapter_evictions_total", "valora:request_queue_time_seconds",
                 "valora:prefix_cache_queries_total", "valora:prefix_cache_hits_total", "valora:prefix_cache_hit_rate"):
        assert f"\n{name}" in metrics.text, name
