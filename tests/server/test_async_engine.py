"""The engine thread in-process: races the HTTP tests cannot time, and the abort-on-leave contract."""

from __future__ import annotations

import asyncio
import time

import pytest

from valora.config import CacheConfig, EngineConfig, SchedulerConfig
from valora.engine.llm_engine import LLMEngine
from valora.sampling_params import SamplingParams
from valora.server.async_engine import AsyncEngine, QueueFullError
from valora.server.errors import APIError
from valora.server.models import ServedModels


@pytest.fixture
def engine(server_model):
    return LLMEngine(EngineConfig(model=str(server_model), device="cpu", dtype="float32", enable_lora=True,
                                  cache=CacheConfig(num_blocks=512), scheduler=SchedulerConfig(max_num_seqs=2)))


def _run(engine: LLMEngine, body, **kw) -> None:
    async def main():
        ae = AsyncEngine(engine, **kw)
        ae.start()
        try:
            await body(ae)
        finally:
            ae.stop()

    asyncio.run(main())


def test_adapter_unloaded_between_resolve_and_add_is_not_loaded_back(engine, server_model, adapters):
    models = ServedModels(["m"], str(server_model), engine.max_model_len)
    lora = models.new_adapter("a", str(adapters["lora0"]))
    engine.add_lora(lora)
    models.adapters["a"] = lora
    resolved = models.resolve("a")
    assert engine.remove_lora("a")  # an unload lands after the request resolved its model, before it is added
    del models.adapters["a"]

    async def body(ae: AsyncEngine) -> None:
        with pytest.raises(APIError) as e:
            async for _ in ae.generate("r1", "hello", SamplingParams(max_tokens=2), resolved):
                pass
        assert e.value.status == 404 and engine.list_loras() == []
        outs = [o async for o in ae.generate("r2", "hello", SamplingParams(max_tokens=2, temperature=0))]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2

    _run(engine, body, max_queued=4, admit=models.check_served)


def test_leaving_early_aborts_and_frees_blocks_and_the_queue_limit_holds(engine):
    async def body(ae: AsyncEngine) -> None:
        params = SamplingParams(max_tokens=3000, ignore_eos=True)
        first = ae.generate("one", "hello", params)
        second = ae.generate("two", "hello", params)
        assert not (await anext(first)).finished and not (await anext(second)).finished
        assert engine.blocks.usage > 0 and ae.num_in_flight == 2
        with pytest.raises(QueueFullError):  # max_num_seqs 2, nothing may queue
            await anext(ae.generate("third", "hello", params))
        await first.aclose()
        await second.aclose()
        assert ae.num_in_flight == 0
        deadline = time.monotonic() + 10
        while ae.stats.num_running or ae.stats.kv_cache_usage:
            assert time.monotonic() < deadline, ae.stats
            await asyncio.sleep(0.01)
        assert engine.blocks.usage == 0.0 and not engine.has_unfinished_requests()

    _run(engine, body, max_queued=0)
