"""`valora serve --tensor-parallel-size 2` on the CPU (the engine core and one gloo worker process): the same
greedy answers as one process, streamed and not, with adapters; the workers go when the server stops."""

from __future__ import annotations

import asyncio

import openai

from tests.server.process import SERVED


def _answers(server, adapters) -> list[list[str]]:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def one(model: str, prompt: str, stream: bool) -> str:
        args = dict(model=model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
        if not stream:
            return (await client.completions.create(**args)).choices[0].text
        return "".join([c.choices[0].text async for c in await client.completions.create(**args, stream=True)
                        if c.choices])

    async def run():
        jobs = [(m, p, s) for m in (SERVED, "lora1", "lora3") for p in ("a red car", "the quick fox")
                for s in (False, True)]
        return await asyncio.gather(*[one(*j) for j in jobs])

    return asyncio.run(run())


def test_two_ranks_serve_what_one_does(start_server, adapters):
    modules = ["--lora-modules", f"lora1={adapters['lora1']}", f"lora3={adapters['lora3']}"]
    one = _answers(start_server(modules), adapters)
    assert any(one)
    server = start_server([*modules, "--tensor-parallel-size", "2"])
    assert _answers(server, adapters) == one
    server.stop()
    assert "tensor parallelism over 2 ranks (gloo)" in server.log_path.read_text()
