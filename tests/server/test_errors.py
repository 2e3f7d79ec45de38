"""Acceptance 3: every kind of bad input gets an OpenAI-shaped error with the right status, and the very next
good request is served. The server runs with an API key, an adapter root and small limits so that each limit
can be hit cheaply."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time

import httpx
import openai
import pytest
from PIL import Image

from tests.multimodal.media_server import MediaServer
from tests.server.process import SERVED, gauge, stream_outcome
from valora.multimodal.chat import image_data_url
from valora.multimodal.video import video_data_url
from valora.testing.images import random_image

KEY = "test-key"
LIMITS = ["--max-num-seqs", "2", "--max-queued-requests", "1", "--max-model-len", "4096", "--num-kv-blocks", "1024",
          "--max-images-per-prompt", "2", "--max-image-pixels", "40000", "--max-image-bytes", "50000",
          "--max-request-body-bytes", "300000", "--max-video-bytes", "30000", "--max-videos-per-prompt", "2",
          "--max-video-frames", "8"]


def chat(*image_urls: str, text: str = "What is this?", videos: tuple[str, ...] = (), **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in image_urls]
    content += [{"type": "video_url", "video_url": {"url": u}} for u in videos]
    return {"model": SERVED, "max_tokens": 2, "messages": [{"role": "user", "content": [
        *content, {"type": "text", "text": text}]}], **extra}


def clip(frames: int = 3, seed: int = 0) -> str:
    return video_data_url([random_image(56, 84, seed=seed + i) for i in range(frames)], fps=2)


@pytest.fixture(scope="module")
def lora_root(tmp_path_factory, adapters):
    """An adapter root with a good adapter, a corrupt one, and a symlink that leads out of it."""
    root = tmp_path_factory.mktemp("lora-root")
    shutil.copytree(adapters["lora0"], root / "good")
    shutil.copytree(adapters["lora0"], root / "corrupt")
    (root / "corrupt" / "adapter_config.json").write_text("{ not json")
    (root / "escape").symlink_to(adapters["lora1"], target_is_directory=True)
    for name, update in BAD_CONFIGS.items():
        shutil.copytree(adapters["lora0"], root / name)
        cfg = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps(cfg | update))
    return root


# adapter_config.json values that raised inside the load (a 500) or loaded silently in issue 23
BAD_CONFIGS = {"fractional-rank": {"r": 0.5}, "nan-alpha": {"lora_alpha": float("nan")},
               "bad-pattern": {"alpha_pattern": {"(": 4}}, "rank-not-the-tensors": {"r": 10}}


@pytest.fixture(scope="module")
def site():
    """A local web site for remote images and videos: the server allows its host (127.0.0.1) and no other."""
    png = base64.b64decode(image_data_url(random_image(56, 56, seed=3)).partition(",")[2])
    mp4 = base64.b64decode(clip().partition(",")[2])
    with MediaServer({"/cat.png": png, "/clip.mp4": mp4},
                     {"/moved": "/cat.png", "/away": "http://localhost:1/cat.png"}) as server:
        yield server


@pytest.fixture(scope="module")
def server(start_server, lora_root):
    return start_server(["--lora-root", str(lora_root), *LIMITS, "--allowed-media-domains", "127.0.0.1",
                         "--media-fetch-timeout", "2"], api_key=KEY)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=server.headers, timeout=60) as client:
        yield client


def assert_error(r: httpx.Response, status: int, code: str, fragment: str = "") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert body["error"]["code"] == code, body
    assert fragment.lower() in body["error"]["message"].lower(), body
    return body["error"]


def assert_still_serving(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json=chat(image_data_url(random_image(56, 56, seed=1))))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


LONG_PROMPT = " ".join(["zebra"] * 5000)
BIG_FLAT = Image.new("RGB", (300, 300), (200, 30, 30))  # 90,000 pixels (limit 40,000) in a few hundred bytes

# id -> (request kwargs for httpx, status, error code, a fragment of the message)
BAD_CHAT = {
    "malformed-json": (dict(content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"}),
                       400, "invalid_json", "not valid json"),
    "lone-surrogate": (dict(content=json.dumps(chat(text="a\ud800b")).encode(),  # valid JSON, no Unicode text
                            headers={"content-type": "application/json"}), 400, "invalid_json", "lone UTF-16"),
    "encoded-surrogate": (dict(content=json.dumps(chat(text="a\ud800b"), ensure_ascii=False).encode(
        "utf-8", "surrogatepass"), headers={"content-type": "application/json"}), 400, "invalid_json", "not UTF-8"),
    "messages-not-a-list": (dict(json={"model": SERVED, "messages": "hello"}), 400, "invalid_value", "messages"),
    "max-tokens-not-an-int": (dict(json=chat(max_tokens="many")), 400, "invalid_value", "max_tokens"),
    "temperature-out-of-range": (dict(json=chat(temperature=-1)), 400, "invalid_value", "temperature"),
    "too-many-top-logprobs": (dict(json=chat(logprobs=True, top_logprobs=21)), 400, "invalid_value", "top_logprobs"),
    "bad-grammar": (dict(json=chat(guided_regex="[a-")), 400, "invalid_structured_output", "regex"),
    "unknown-model": (dict(json=chat() | {"model": "no-such-adapter"}), 404, "model_not_found", "no-such-adapter"),
    "prompt-over-context": (dict(json=chat(text=LONG_PROMPT)), 400, "invalid_prompt", "context length"),
    "max-tokens-too-large": (dict(json=chat(max_tokens=5000)), 400, "context_length_exceeded", "max_tokens"),
    "not-an-image": (dict(json=chat("data:image/png;base64," + base64.b64encode(b"hello, not a png").decode())),
                     400, "invalid_image", "cannot read image"),
    "bad-base64": (dict(json=chat("data:image/png;base64,@@@")), 400, "invalid_image", "base64"),
    "too-many-pixels": (dict(json=chat(image_data_url(BIG_FLAT))), 400, "invalid_image", "pixels"),
    "too-many-bytes": (dict(json=chat(image_data_url(random_image(150, 150)))), 400, "invalid_image", "bytes"),
    "too-many-images": (dict(json=chat(*[image_data_url(random_image(56, 56, seed=i)) for i in range(3)])), 400,
                        "too_many_images", "limit of 2"),
    "remote-image-off-the-list": (dict(json=chat("https://example.com/cat.png")), 400, "invalid_image",
                                  "not in --allowed-media-domains"),
    "local-file-not-allowed": (dict(json=chat("file:///etc/hostname")), 400, "invalid_image", "local image"),
    # videos (issue 17): each refused with a 400 naming the problem, and the server keeps serving
    "not-a-video": (dict(json=chat(videos=("data:video/mp4;base64," + base64.b64encode(b"not an mp4").decode(),))),
                    400, "invalid_video", "cannot read video"),
    "video-too-many-bytes": (dict(json=chat(videos=(clip(frames=12),))), 400, "invalid_video",
                             "over the limit of 30000"),
    "too-many-videos": (dict(json=chat(videos=(clip(1), clip(1), clip(1)))), 400, "invalid_video", "limit of 2"),
    "too-many-video-frames": (dict(json=chat(videos=(clip(),), media_io_kwargs={"video": {"num_frames": 9}})), 400,
                              "invalid_video", "over the limit of 8"),
    "bad-video-sampling": (dict(json=chat(videos=(clip(),), media_io_kwargs={"video": {"fps": -1}})), 400,
                           "invalid_video", "fps must be a positive number"),
    "local-video-not-allowed": (dict(json=chat(videos=("file:///etc/hostname",))), 400, "invalid_video",
                                "local video"),
    "body-over-limit": (dict(json=chat(text="x" * 400_000)), 413, "request_too_large", "300000"),
    # issue 23, item 1: each was a 500 (or a 200 and then an error event when streamed)
    "seed-over-uint64": (dict(json=chat(seed=2**64)), 400, "invalid_value", "seed"),
    "seed-under-int64": (dict(json=chat(seed=-(2**63) - 1, stream=True)), 400, "invalid_value", "seed"),
    "seed-10e30": (dict(json=chat(seed=10**30)), 400, "invalid_value", "seed"),
    "aspect-ratio-wide": (dict(json=chat(image_data_url(Image.new("RGB", (1000, 4))))), 400, "invalid_image",
                          "200 times"),
    "aspect-ratio-tall": (dict(json=chat(image_data_url(Image.new("RGB", (4, 1000))), stream=True)), 400,
                          "invalid_image", "200 times"),
    "one-pixel-high": (dict(json=chat(image_data_url(Image.new("RGB", (300, 1))))), 400, "invalid_image",
                       "at least 4"),
    "role-not-a-string": (dict(json={"model": SERVED, "messages": [{"role": ["user"], "content": "hi"}]}), 400,
                          "invalid_value", "role"),
    "role-not-a-role": (dict(json={"model": SERVED, "messages": [{"role": "user<|im_end|>", "content": "hi"}]}),
                        400, "invalid_value", "role"),
    "text-not-a-string": (dict(json={"model": SERVED, "messages": [{"role": "user", "content": [
        {"type": "text", "text": [[["deep"]]]}]}]}), 400, "invalid_value", "text"),
    "unknown-part-type": (dict(json={"model": SERVED, "messages": [{"role": "user", "content": [
        {"type": "audio", "audio": "x"}]}]}), 400, "invalid_value", "audio"),
    "string-for-an-integer": (dict(json=chat(max_tokens="2")), 400, "invalid_value", "max_tokens"),
    "model-with-newline": (dict(json=chat() | {"model": "x\nINFO forged"}), 400, "invalid_value", "model"),
    "model-too-long": (dict(json=chat() | {"model": "m" * 100_000}), 400, "invalid_value", "model"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_request_then_good_one(http, case):
    kwargs, status, code, fragment = BAD_CHAT[case]
    assert_error(http.post("/v1/chat/completions", **kwargs), status, code, fragment)
    assert_still_serving(http)


def test_text_written_as_surrogate_pairs_is_served(http):
    r = http.post("/v1/chat/completions", content=json.dumps(chat(text="smile \U0001f600")).encode(),
                  headers={"content-type": "application/json"})  # json.dumps writes the emoji as "\ud83d\ude00"
    assert r.status_code == 200, r.text


def test_remote_images_and_videos_come_from_allowed_hosts_only(http, site):
    for body in (chat(site.url("/cat.png")), chat(site.url("/moved")), chat(videos=(site.url("/clip.mp4"),))):
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
    assert_error(http.post("/v1/chat/completions", json=chat(videos=(site.url("/clip.mp4", host="localhost"),))),
                 400, "invalid_video", "not in --allowed-media-domains")
    for url, fragment in ((site.url("/cat.png", host="localhost"), "not in --allowed-media-domains"),
                          (site.url("/away"), "not in --allowed-media-domains"),
                          (site.url("/undeclared/60000"), "over the limit of 50000"),
                          (site.url("/trickle"), "took over 2 s"), (site.url("/gone"), "HTTP 404")):
        assert_error(http.post("/v1/chat/completions", json=chat(url)), 400, "invalid_image", fragment)
    assert_still_serving(http)


def test_bad_completion_requests(http):
    assert_error(http.post("/v1/completions", json={"model": SERVED, "prompt": [], "max_tokens": 2}),
                 400, "invalid_value", "prompt")
    assert_error(http.post("/v1/completions", json={"model": SERVED, "prompt": [10**9], "max_tokens": 2}),
                 400, "invalid_prompt", "prompt_token_ids")
    assert_error(http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "model_not_found")
    assert_still_serving(http)


def test_api_key_required_on_v1_only(server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(), headers=headers)
        assert_error(r, 401, "invalid_api_key")
        assert_error(httpx.get(f"{server.url}/v1/models", headers=headers), 401, "invalid_api_key")
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY).models.list().data] == [SERVED]
    assert_still_serving(http)


def test_openai_client_sees_the_error_body(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**chat(image_data_url(BIG_FLAT)))
    assert e.value.status_code == 400 and e.value.code == "invalid_image"


LOADS = {
    "outside-root": (lambda root, outside: {"lora_name": "x", "lora_path": str(outside)}, "invalid_lora_path",
                     "inside the adapter root"),
    "dot-dot": (lambda root, outside: {"lora_name": "x", "lora_path": "good/../../x"}, "invalid_lora_path", ".."),
    "symlink-out": (lambda root, outside: {"lora_name": "x", "lora_path": "escape"}, "invalid_lora_path", "symlink"),
    "corrupt": (lambda root, outside: {"lora_name": "x", "lora_path": "corrupt"}, "adapter_load_failed",
                "failed to load adapter 'x': corrupt adapter_config.json"),  # the name said once
    "missing": (lambda root, outside: {"lora_name": "x", "lora_path": str(root / "nothing")}, "adapter_load_failed",
                "directory not found"),
    "taken-name": (lambda root, outside: {"lora_name": SERVED, "lora_path": "good"}, "adapter_exists",
                   "already in use"),
    "no-path": (lambda root, outside: {"lora_name": "x"}, "invalid_value", "lora_path"),
    # issue 23, items 1, 6 and 7
    "nul-byte": (lambda root, outside: {"lora_name": "x", "lora_path": "good\0"}, "invalid_lora_path", "NUL"),
    "long-path": (lambda root, outside: {"lora_name": "x", "lora_path": "a/" * 2500}, "invalid_lora_path",
                  "over the limit"),
    "long-component": (lambda root, outside: {"lora_name": "x", "lora_path": "a" * 300}, "invalid_lora_path",
                       "longer than 255"),
    "fractional-rank": (lambda root, outside: {"lora_name": "x", "lora_path": "fractional-rank"},
                        "adapter_load_failed", "positive integer"),
    "nan-alpha": (lambda root, outside: {"lora_name": "x", "lora_path": "nan-alpha"}, "adapter_load_failed",
                  "finite"),
    "bad-pattern": (lambda root, outside: {"lora_name": "x", "lora_path": "bad-pattern"}, "adapter_load_failed",
                    "RE2"),
    "rank-not-the-tensors": (lambda root, outside: {"lora_name": "x", "lora_path": "rank-not-the-tensors"},
                             "adapter_load_failed", "says 10"),
    "name-with-newline": (lambda root, outside: {"lora_name": "x\nINFO forged", "lora_path": "good"},
                          "invalid_value", "lora_name"),
    "name-too-long": (lambda root, outside: {"lora_name": "x" * 10_000, "lora_path": "good"}, "invalid_value",
                      "lora_name"),
    "name-with-dots": (lambda root, outside: {"lora_name": "../evil", "lora_path": "good"}, "invalid_value",
                       "lora_name"),
    "name-blank": (lambda root, outside: {"lora_name": " ", "lora_path": "good"}, "invalid_value", "lora_name"),
}


@pytest.mark.parametrize("case", list(LOADS))
def test_adapter_load_refused_then_good_one(http, lora_root, adapters, case):
    make, code, fragment = LOADS[case]
    assert_error(http.post("/v1/load_lora_adapter", json=make(lora_root, adapters["lora2"])), 400, code, fragment)
    assert "x" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert_still_serving(http)


def test_adapter_inside_root_loads_and_unloads(http):
    assert http.post("/v1/load_lora_adapter", json={"lora_name": "good", "lora_path": "good"}).status_code == 200
    r = http.post("/v1/chat/completions", json=chat() | {"model": "good"})
    assert r.status_code == 200 and r.json()["model"] == "good"
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "good"}).status_code == 200
    assert_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "good"}), 404, "adapter_not_found")
    assert_error(http.post("/v1/chat/completions", json=chat() | {"model": "good"}), 404, "model_not_found")
    assert_still_serving(http)


def test_unknown_route_is_openai_shaped(http):
    """An endpoint this server does not have (the embeddings API, say) is a 404 that names it and lists what is
    served; a 404 of a known route (an unknown model) keeps its own message."""
    err = assert_error(http.post("/v1/embeddings", json={"model": "m", "input": "hi"}), 404, "not_found",
                       "/v1/embeddings is not an endpoint")
    assert "/v1/chat/completions" in err["message"] and "/v1/models" in err["message"], err
    assert_error(http.get("/v1/nothing-here"), 404, "not_found", "/v1/nothing-here")
    assert "not an endpoint" not in assert_error(
        http.post("/v1/completions", json={"model": "nope", "prompt": "hi"}), 404, "model_not_found")["message"]
    assert_still_serving(http)


def test_full_queue_gets_503_with_retry_after(server, http):
    """Two running (--max-num-seqs 2) plus one waiting (--max-queued-requests 1) fill the server."""
    body = chat(max_tokens=4000, ignore_eos=True, stream=True)
    streams = [http.stream("POST", "/v1/chat/completions", json=body) for _ in range(3)]
    responses = [s.__enter__() for s in streams]
    try:
        assert [r.status_code for r in responses] == [200] * 3
        deadline = time.monotonic() + 30
        while True:  # wait until the engine holds all three: two running, one waiting
            m = server.metrics()
            if gauge(m, "valora:num_requests_running") == 2 and gauge(m, "valora:num_requests_waiting") == 1:
                break
            assert time.monotonic() < deadline, m
            time.sleep(0.02)
        r = http.post("/v1/chat/completions", json=chat())
        assert_error(r, 503, "queue_full", "busy")
        assert r.headers["retry-after"] == "1"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    server.wait_idle()
    assert_still_serving(http)


def test_overload_is_refused_before_any_stream_starts(server):
    """Issue 23 item 2: with room for three sequences, 16 concurrent streams each either run to the end or get
    503 with Retry-After before the stream starts; none starts and then fails."""

    async def run() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            body = chat(max_tokens=6, ignore_eos=True, stream=True)
            return await asyncio.gather(*(stream_outcome(client, body) for _ in range(16)))

    results = asyncio.run(run())
    assert "ok" in results and "busy" in results, results
    server.wait_idle()


def test_a_call_that_can_never_fit_is_a_400_not_a_503(http):
    """Issue 23 item 3: more sequences than the server ever holds (2 running + 1 queued) is the client's error."""
    r = http.post("/v1/completions", json={"model": SERVED, "prompt": ["a", "b", "c", "d"], "max_tokens": 2})
    assert_error(r, 400, "request_too_large", "at most 3")
    assert_error(http.post("/v1/chat/completions", json=chat(n=4)), 400, "request_too_large")
    assert_still_serving(http)
