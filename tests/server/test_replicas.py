"""Issue 20, acceptance 2: two replicas of the tiny model behind Ray Serve (`valora serve --data-parallel-size 2`'s
app) answer the OpenAI tests' requests as the offline engine does, streams included; with 8 adapters over 2
replicas of 2 slots (4 held) each, >= 90% of requests land on a replica already holding their adapter once warm
(from /metrics); a replica killed mid-run loses no request that had not started streaming, and is replaced.

One Ray cluster of 2 CPUs (one per replica) serves the whole module; the tests run in order on its state."""

from __future__ import annotations

import asyncio
import random
import shutil
import time

import httpx
import openai
import pytest
import ray

from tests.server.process import SERVED
from tests.server.test_openai_api import MAX_TOKENS, messages
from valora import LLM, LoRARequest, SamplingParams
from valora.cli import main
from valora.server.cli import checked_configs
from valora.server.launch import free_port
from valora.serving import ray as replicas
from valora.serving.cli import parse_serve_args


@pytest.fixture(scope="module")
def url(server_model, adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-root")  # adapters loaded at run time come from here
    shutil.copytree(adapters["lora5"], root / "late")
    shutil.copytree(adapters["lora2"], root / "onfirstuse")
    args = parse_serve_args([str(server_model), "--served-model-name", SERVED, "--device", "cpu",
                             "--lora-modules", *[f"{n}={p}" for n, p in adapters.items()],
                             "--lora-root", str(root), "--enable-lora-resolver",
                             "--max-loras", "2", "--max-cpu-loras", "4", "--max-num-seqs", "8", "--enforce-eager",
                             "--max-model-len", "2048", "--num-kv-blocks", "256"])
    engine, config = checked_configs(args)
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        replicas.start(engine, config, 2, "127.0.0.1", port, keep_alive_s=5)
        yield f"http://127.0.0.1:{port}"
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(server_model, adapters):
    """The offline engine over the same model and adapters: the answers every replica must give."""
    llm = LLM(str(server_model), enable_lora=True, max_loras=8, num_kv_blocks=512, max_model_len=2048,
              device="cpu", dtype="float32")
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}

    def chat(model: str, msgs: list[dict], max_tokens: int = MAX_TOKENS) -> str:
        sp = SamplingParams(temperature=0, max_tokens=max_tokens)
        return llm.chat(msgs, sp, lora_request=loras.get(model), use_tqdm=False)[0].outputs[0].text

    def complete(requests: list[tuple[str, str]], max_tokens: int = MAX_TOKENS) -> list[str]:
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([p for _, p in requests], sp, lora_request=[loras.get(m) for m, _ in requests],
                            use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    chat.complete = complete
    return chat


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def by_replica(m: dict[str, float], name: str, labels: str = "") -> dict[str, float]:
    """{replica: value} of the series of `name` that also carry `labels`."""
    return {key.split('replica="')[1].split('"')[0]: v for key, v in m.items()
            if key.startswith(name + "{") and labels in key}


def _total(m: dict[str, float], name: str, labels: str) -> float:
    return sum(by_replica(m, name, labels).values())


def test_openai_requests_through_replicas(url, client, offline, adapters):
    assert {m.id for m in client.models.list().data} == {SERVED, *adapters}
    for model in (SERVED, "lora4"):  # lora4 adapts the vision tower too
        got = client.chat.completions.create(model=model, messages=messages(0), temperature=0, max_tokens=MAX_TOKENS)
        assert got.choices[0].message.content == offline(model, messages(0)), model
        assert got.model == model
    stream = client.chat.completions.create(model="lora1", messages=messages(2), temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == offline("lora1", messages(2))
    assert chunks[-1].usage.completion_tokens > 0
    (want,) = offline.complete([("lora3", "Hello world")])
    kw = dict(model="lora3", prompt="Hello world", max_tokens=MAX_TOKENS, temperature=0,
              extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == want
    assert "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices) == want
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # refused by the replica's own validation, passed back unchanged
        client.completions.create(model="lora0", prompt="hi", max_tokens=-1)

    aborted = _total(metrics(url), "valora:request_success_total", 'finished_reason="abort"')
    body = {"model": "lora6", "prompt": "a long one", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:  # read a little, then leave
        assert [line for line, _ in zip((x for x in r.iter_lines() if x.startswith("data: {")), range(3))]
    deadline = time.monotonic() + 30  # the replica's app saw the client go, and aborted the request
    while _total(metrics(url), "valora:request_success_total", 'finished_reason="abort"') != aborted + 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)

    load = {"lora_name": "late5", "lora_path": str(adapters["lora5"])}
    r = httpx.post(f"{url}/v1/load_lora_adapter", json=load)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_lora_path"  # outside --lora-root
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={**load, "lora_path": "late"})
    assert r.status_code == 200, r.text
    got = client.chat.completions.create(model="late5", messages=messages(4), temperature=0, max_tokens=MAX_TOKENS)
    assert got.choices[0].message.content == offline("lora5", messages(4))
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "late5"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="late5", messages=messages(4), max_tokens=2)
    got = client.chat.completions.create(model="onfirstuse", messages=messages(4), temperature=0,
                                         max_tokens=MAX_TOKENS)  # --enable-lora-resolver: loaded first
    assert got.choices[0].message.content == offline("lora2", messages(4))
    assert "onfirstuse" in {m.id for m in client.models.list().data}


def test_requests_land_where_their_adapter_is(url, adapters):
    """Warm: rounds of one request per adapter, one at a time, until a round finds every adapter where the router
    sends it (the first rounds settle which adapters each replica keeps); then 64 requests, 4 at a time in a
    shuffled mix: the router keeps each adapter on one replica, so nearly every request finds it loaded there;
    round robin would find it about half the time (4 of 8 adapters held per replica).

    The previous test's adapter loaded on first use is unloaded at the ingress but still held by a replica until
    others push it out (least recently used), so 9 adapters compete for the 8 places at first: a miss goes to
    either replica (both hold 4), and only one of the two evicts the stale adapter, so a warm-up round settles the
    placement with a probability of about one half (a full run of the suite once needed six)."""
    names = list(adapters)
    name = "valora:adapter_affinity_requests_total"

    async def run(models: list[str], at_once: int) -> None:
        gate = asyncio.Semaphore(at_once)

        async def one(model: str) -> None:
            async with gate:
                await client.completions.create(model=model, prompt="a red car", max_tokens=2, temperature=0)

        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            await asyncio.gather(*(one(m) for m in models))

    def settled() -> dict[str, float]:
        time.sleep(replicas.PUBLISH_S * 1.5)  # every replica has published since the last request
        return metrics(url)

    def affinity(models: list[str], at_once: int) -> tuple[float, float]:
        """(hits, misses) of these requests, from the replicas' counters."""
        before = settled()
        asyncio.run(run(models, at_once))
        deadline = time.monotonic() + 30
        while True:
            after = settled()
            hits, misses = (_total(after, name, f'resident="{r}"') - _total(before, name, f'resident="{r}"')
                            for r in ("true", "false"))
            if hits + misses >= len(models) or time.monotonic() > deadline:
                return hits, misses
    rounds = 1
    while affinity(names, 1)[1]:
        rounds += 1
        assert rounds <= 12, "12 rounds of one request per adapter never found every adapter resident"
    mix = names * 8
    random.Random(0).shuffle(mix)
    hits, misses = affinity(mix, 4)
    print(f"adapter affinity once warm ({rounds} warm-up rounds): {hits:.0f} of {hits + misses:.0f} requests "
          "found their adapter loaded")
    assert hits + misses == len(mix)
    assert hits >= 0.9 * len(mix)
    after = metrics(url)
    served = by_replica(after, "valora:request_success_total", 'finished_reason="length"')
    assert len(served) == 2 and all(v > 0 for v in served.values())  # both replicas took part


COMPLETION_TOKENS = 160


def test_a_replica_lost_mid_run_loses_no_request_that_had_not_started(url, offline, adapters):
    """Eight non-streaming completions over all adapters (so over both replicas) and two streams; once the streams
    are under way one replica is killed. Every completion is answered, those of the lost replica by the other one;
    a stream either finishes or ends with an error event; the replica is replaced and serves again. The completions
    are long enough (COMPLETION_TOKENS) to be still running once the streams have started: with 24 tokens a full
    suite run once saw nothing retried, the killed replica's completions having finished, it seems, before the
    kill."""
    requests = [(name, f"request {i} about a red car") for i, name in enumerate(adapters)]
    want = offline.complete(requests, max_tokens=COMPLETION_TOKENS)
    before = metrics(url)
    engines = sorted(by_replica(before, "valora:num_requests_running"))
    assert len(engines) == 2

    def client() -> openai.AsyncOpenAI:  # one per event loop
        return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)

    async def complete(model: str, prompt: str) -> str:
        async with client() as c:
            got = await c.completions.create(model=model, prompt=prompt, max_tokens=COMPLETION_TOKENS, temperature=0,
                                              extra_body={"ignore_eos": True})
        return got.choices[0].text

    async def stream(model: str, started: asyncio.Event) -> str | None:
        parts = []
        async with client() as c:
            try:
                async for chunk in await c.completions.create(model=model, prompt="a stream", max_tokens=48,
                                                              temperature=0, stream=True,
                                                              extra_body={"ignore_eos": True}):
                    started.set()
                    parts.append(chunk.choices[0].text if chunk.choices else "")
            except openai.APIError as e:  # the error event of a stream whose replica was lost
                assert "replica" in str(e)
                return None
        return "".join(parts)

    async def run():
        started = [asyncio.Event(), asyncio.Event()]
        streams = [asyncio.ensure_future(stream(m, s)) for m, s in zip(("lora0", "lora5"), started)]
        completions = asyncio.gather(*(complete(m, p) for m, p in requests))
        await asyncio.wait_for(asyncio.gather(*(s.wait() for s in started)), 60)
        kill(engines[0])
        return await completions, await asyncio.gather(*streams)

    got, _ = asyncio.run(run())
    assert got == want
    assert metrics(url)["valora:request_retries_total"] > before.get("valora:request_retries_total", 0)

    deadline = time.monotonic() + 120  # a new replica: an actor, an engine core process, the model
    while set(live := by_replica(metrics(url), "valora:num_requests_running")) & {engines[0]} or len(live) != 2:
        assert time.monotonic() < deadline, live
        time.sleep(1)

    async def again() -> list[str]:
        return await asyncio.gather(*(complete(m, p) for m, p in requests))

    assert asyncio.run(again()) == want


def kill(replica: str) -> None:
    (name,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if "valora-engine" in a["name"] and a["name"].endswith(replica)]
    ray.kill(ray.get_actor(name["name"], namespace=name["namespace"]), no_restart=True)


def test_replica_flags_refuse_what_only_one_server_has(server_model, capsys):
    assert main(["serve", str(server_model), "--data-parallel-size", "2", "--limit-concurrency", "8"]) == 2
    assert "--limit-concurrency applies to one server" in capsys.readouterr().err
    assert main(["serve", str(server_model), "--data-parallel-size", "0"]) == 2
