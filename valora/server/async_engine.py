"""`AsyncEngine`: the server's front end to the engine core, on the event loop of one API-server process.

It owns what happens to a request outside the core: admission (capacity is counted from the moment a request is
accepted, preprocessing included), the input processor's result turned into the core's requests (`n` fanned
out), the add and its acknowledgement (before any response starts), and the output processor, which turns the
core's per-step token deltas into `RequestOutput`s for each request's stream and aborts what ends on a stop
string. The core runs elsewhere (`engine/core_proc.py`); only ready inputs and token deltas cross over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from valora.engine.core_client import CoreClient
from valora.engine.core_host import AdapterEvent, CoreInfo
from valora.engine.errors import EngineDeadError, check_capacity
from valora.engine.input_processor import InputProcessor
from valora.engine.llm_engine import EngineStats
from valora.engine.output_processor import OutputProcessor
from valora.engine.request import EngineCoreOutput
from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.multimodal.inputs import ProcessedPrompt
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams
from valora.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)


class ClientDisconnectedError(Exception):
    """The client went away before its request finished; the request has been aborted."""


@dataclass
class Prepared:
    """One prompt of an API call, processed and checked: what the core will run."""

    request_id: str
    text: str | None
    processed: ProcessedPrompt
    params: SamplingParams | HeadParams
    lora: LoRARequest | None

    @property
    def num_sequences(self) -> int:
        return 1 if isinstance(self.params, HeadParams) else self.params.n


@dataclass
class Admission:
    """Room for `count` sequences, held from acceptance until the call ends."""

    engine: AsyncEngine
    count: int
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.engine.num_in_flight -= self.count


class AsyncEngine:
    def __init__(self, address: str, input_processor: InputProcessor, max_in_flight: int,
                 on_adapter: Callable[[AdapterEvent], None], metrics: ServerMetrics | None = None,
                 poll_interval: float = 0.5) -> None:
        self.input_processor = input_processor
        self.output_processor = OutputProcessor(input_processor.tokenizer)
        self.max_in_flight = max_in_flight
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.on_adapter = on_adapter
        self.client = CoreClient(address, self._on_outputs, on_adapter, self._on_dead)
        self.num_in_flight = 0  # sequences accepted by this front end and not finished
        self.stats: EngineStats | None = None  # the core's, as of the last `refresh_stats`
        self._calls: dict[str, _Call] = {}  # request id (one prompt) -> the call it belongs to

    @property
    def error(self) -> EngineDeadError | None:
        return self.client.error

    async def start(self) -> CoreInfo:
        info = await self.client.start()
        for event in info.adapters:
            self.on_adapter(event)
        self.stats = await self.client.call("stats")
        return info

    async def stop(self) -> None:
        await self.client.close()

    async def refresh_stats(self, timeout_s: float = 5.0) -> EngineStats | None:
        if self.error is None:
            with contextlib.suppress(TimeoutError, EngineDeadError):
                self.stats = await asyncio.wait_for(self.client.call("stats"), timeout_s)
        return self.stats

    # -- admission and adds ---------------------------------------------------------------------------------
    def admit(self, count: int) -> Admission:
        """Hold room for `count` sequences (prompts x n) from now on, or refuse: `EngineDeadError`, `InputError`
        for a call that could never fit, `QueueFullError` when it does not fit now."""
        if self.error is not None:
            raise self.error
        check_capacity(self.num_in_flight, count, self.max_in_flight)
        self.num_in_flight += count
        return Admission(self, count)

    async def add(self, admission: Admission, prepared: list[Prepared], arrival_time: float,
                  is_disconnected: Callable[[], Awaitable[bool]] | None = None) -> CallOutputs:
        """Queue one API call's prompts in the core; returns once the core accepted them all (or raises its
        refusal: nothing of the call is left anywhere)."""
        call = _Call(self, admission, prepared, is_disconnected)
        reqs = []
        for p in prepared:
            self.output_processor.add_request(p.request_id, p.text, p.processed.token_ids, p.params,
                                              p.lora.lora_name if p.lora else None, arrival_time)
            self._calls[p.request_id] = call
            reqs += self.input_processor.core_requests(p.request_id, p.processed, p.params, p.lora, arrival_time)
        try:
            await self.client.add(reqs)
        except BaseException:
            call.forget()
            raise
        return CallOutputs(call)

    # -- core events (on the event loop) ------------------------------------------------------------------------
    def _on_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        processed = self.output_processor.process_outputs(outputs, time.time())
        self.client.abort(processed.reqs_to_abort)
        for out in processed.request_outputs:
            call = self._calls.get(out.request_id)
            if call is not None:
                call.deliver(out)
            if out.finished and self.metrics is not None:
                self.metrics.finished(out)

    def _on_dead(self, error: EngineDeadError) -> None:
        for call in set(self._calls.values()):
            call.queue.put_nowait(error)


@dataclass(eq=False)
class _Call:
    engine: AsyncEngine
    admission: Admission
    prepared: list[Prepared]
    is_disconnected: Callable[[], Awaitable[bool]] | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: dict[str, int] = field(init=False)
    finished: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.index = {p.request_id: i for i, p in enumerate(self.prepared)}

    def deliver(self, out: RequestOutput) -> None:
        self.queue.put_nowait((self.index[out.request_id], out))
        if out.finished:
            self.finished.add(out.request_id)
            self.engine._calls.pop(out.request_id, None)
            if len(self.finished) == len(self.prepared):
                self.admission.release()

    def forget(self) -> None:
        """Drop what is left of the call: its unfinished requests are aborted in the core."""
        engine = self.engine
        for p in self.prepared:
            engine._calls.pop(p.request_id, None)
            engine.client.abort(engine.output_processor.abort_request(p.request_id))
        self.admission.release()


class CallOutputs:
    """One API call's outputs as they come: (prompt index, its `RequestOutput` so far). Outputs are cumulative,
    so one that a newer one of the same prompt supersedes is skipped. Leaving early aborts what is unfinished."""

    def __init__(self, call: _Call) -> None:
        self.call = call

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        call = self.call
        done = 0
        next_check = time.monotonic() + call.engine.poll_interval
        try:
            while done < len(call.prepared):
                try:
                    item = await asyncio.wait_for(call.queue.get(), call.engine.poll_interval
                                                  if call.is_disconnected else None)
                except TimeoutError:
                    item = None
                if call.is_disconnected is not None and time.monotonic() >= next_check:
                    if await call.is_disconnected():
                        raise ClientDisconnectedError()
                    next_check = time.monotonic() + call.engine.poll_interval
                if item is None:
                    continue
                for i, out in self._newest(item):
                    done += out.finished
                    yield i, out
        finally:
            call.forget()

    def _newest(self, first) -> list[tuple[int, RequestOutput]]:
        items = [first]
        while not self.call.queue.empty():
            items.append(self.call.queue.get_nowait())
        errors = [e for e in items if isinstance(e, BaseException)]
        if errors:
            raise errors[0]
        newest: dict[int, RequestOutput] = {}
        for i, out in items:
            newest[i] = out
        return list(newest.items())

