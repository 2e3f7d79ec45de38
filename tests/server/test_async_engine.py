"""The front end and the engine core in-process (the core's loop on a thread, the same messages as across
processes): races the HTTP tests cannot time, admission, the abort-on-leave contract, two front ends on one
core, and a core step loop that never does prompt work."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from transformers import PreTrainedTokenizerBase
from transformers.image_processing_utils import BaseImageProcessor

from valora.config import CacheConfig, EngineConfig, SchedulerConfig
from valora.engine.core_proc import CoreProcess
from valora.engine.errors import AdapterNotLoadedError, QueueFullError
from valora.engine.input_processor import InputProcessor
from valora.models.processing import ImagePromptProcessor
from valora.multimodal.chat import MediaSources
from valora.multimodal.inputs import InputError
from valora.sampling_params import SamplingParams
from valora.server.async_engine import AsyncEngine, Prepared
from valora.server.models import ServedModels
from valora.testing.images import random_image

CAP = 2  # max_num_seqs 2, nothing may queue


@pytest.fixture
def setup(server_model):
    config = EngineConfig(model=str(server_model), device="cpu", dtype="float32", enable_lora=True,
                          cache=CacheConfig(num_blocks=512), scheduler=SchedulerConfig(max_num_seqs=CAP))
    core = CoreProcess(config, max_in_flight=CAP, in_thread=True)
    core.wait_ready()
    yield config, core
    core.stop()


def _run(setup, body, front_ends: int = 1) -> None:
    config, core = setup
    inputs = InputProcessor(config, core.info.max_model_len)

    async def main():
        pairs = []
        for _ in range(front_ends):
            models = ServedModels(["m"], config.model, core.info.max_model_len)
            engine = AsyncEngine(core.address, inputs, CAP, models.apply)
            await engine.start()
            pairs.append((engine, models))
        try:
            await body(*pairs)
        finally:
            for engine, _ in pairs:
                await engine.stop()

    asyncio.run(main())


def _prepared(engine: AsyncEngine, rid: str, prompt, params: SamplingParams, lora=None) -> Prepared:
    return Prepared(rid, *engine.input_processor.process(prompt), params, lora)


async def _eventually(condition, timeout: float = 10.0) -> None:
    """Wait for another front end's socket to deliver a broadcast (ordered per socket, not across sockets)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the broadcast never arrived"
        await asyncio.sleep(0.01)


async def _drain(engine: AsyncEngine, prepared: list[Prepared]):
    outputs = await engine.add(engine.admit(sum(p.num_sequences for p in prepared)), prepared, time.time())
    return [out async for _, out in outputs]


def test_adapter_unloaded_while_a_request_is_prepared_is_refused_before_it_starts(setup, adapters):
    async def body(fe):
        engine, models = fe
        await engine.client.call("load_lora", "a", str(adapters["lora0"]))
        resolved = models.resolve("a")  # the request resolved its model ...
        gone = await engine.client.call("unload_lora", "a")  # ... then the adapter went, before the add
        assert gone and "a" not in models.adapters
        prep = _prepared(engine, "r1", "hello", SamplingParams(max_tokens=2), resolved)
        with pytest.raises(AdapterNotLoadedError):
            await engine.add(engine.admit(1), [prep], time.time())
        assert engine.num_in_flight == 0 and (await engine.refresh_stats()).num_waiting == 0
        outs = await _drain(engine, [_prepared(engine, "r2", "hello", SamplingParams(max_tokens=2, temperature=0))])
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2

    _run(setup, body)


def test_capacity_is_held_from_admission_and_a_call_that_never_fits_is_refused(setup):
    async def body(fe):
        engine, _ = fe
        with pytest.raises(InputError):  # three sequences can never fit a cap of two: 400, not 503 forever
            engine.admit(3)
        held = engine.admit(2)  # held while its prompts are still being prepared
        with pytest.raises(QueueFullError):
            engine.admit(1)
        held.release()
        engine.admit(1).release()

    _run(setup, body)


def test_leaving_early_aborts_and_frees_blocks(setup):
    async def body(fe):
        engine, _ = fe
        params = SamplingParams(max_tokens=3000, ignore_eos=True)
        streams = []
        for rid in ("one", "two"):
            outputs = await engine.add(engine.admit(1), [_prepared(engine, rid, "hello", params)], time.time())
            streams.append(aiter(outputs))
        assert not (await anext(streams[0]))[1].finished and not (await anext(streams[1]))[1].finished
        stats = await engine.refresh_stats()
        assert stats.kv_cache_usage > 0 and engine.num_in_flight == 2
        for s in streams:
            await s.aclose()
        assert engine.num_in_flight == 0
        deadline = time.monotonic() + 10
        while (stats := await engine.refresh_stats()).num_running or stats.kv_cache_usage:
            assert time.monotonic() < deadline, stats
            await asyncio.sleep(0.01)

    _run(setup, body)


def test_two_front_ends_share_the_adapters_and_the_cap(setup, adapters):
    async def body(a, b):
        (fe_a, models_a), (fe_b, models_b) = a, b
        await fe_a.client.call("load_lora", "x", str(adapters["lora1"]))
        assert "x" in models_a.adapters  # the caller is told before its call returns, the other front end soon after
        await _eventually(lambda: models_b.adapters.get("x") == models_a.adapters["x"])
        params = SamplingParams(max_tokens=3000, ignore_eos=True)
        outputs = await fe_a.add(fe_a.admit(2), [_prepared(fe_a, "a1", "hello", params),
                                                 _prepared(fe_a, "a2", "hi", params, models_a.resolve("x"))],
                                 time.time())
        admission = fe_b.admit(1)  # b's own count is zero, but the core is full: refused before anything starts
        with pytest.raises(QueueFullError):
            await fe_b.add(admission, [_prepared(fe_b, "b1", "hello", params)], time.time())
        await aiter(outputs).aclose()
        await fe_b.client.call("unload_lora", "x")
        assert "x" not in models_b.adapters
        await _eventually(lambda: "x" not in models_a.adapters)

    _run(setup, body, front_ends=2)


def test_the_core_step_loop_never_tokenises_nor_processes_images(setup, monkeypatch):
    """Prompt work happens on the front end's threads only: every tokenizer encode and image-processor call is
    recorded with its thread while image requests are served; the core's thread (`valora-core`) makes none."""
    threads: list[str] = []

    def spy(cls, name):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return original(*args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    for cls, name in ((PreTrainedTokenizerBase, "__call__"), (PreTrainedTokenizerBase, "encode"),
                      (BaseImageProcessor, "__call__"), (ImagePromptProcessor, "__call__")):
        spy(cls, name)

    async def body(fe):
        engine, _ = fe
        params = SamplingParams(max_tokens=4, temperature=0)
        for i in range(3):
            prompt = engine.input_processor.chat_prompt([{"role": "user", "content": [
                {"type": "image", "image": random_image(56, 56, seed=i)}, {"type": "text", "text": "What?"}]}],
                MediaSources())
            prep = await asyncio.to_thread(_prepared, engine, f"img{i}", prompt, params)
            outs = await _drain(engine, [prep])
            assert len(outs[-1].outputs[0].token_ids) == 4

    _run(setup, body)
    assert threads and "valora-core" not in threads, threads
