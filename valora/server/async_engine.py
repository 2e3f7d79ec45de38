"""One `LLMEngine` driven by one dedicated thread, fed from the asyncio event loop.

The engine is not thread-safe, so everything that touches it (adding, aborting, loading adapters, stepping)
runs on the engine thread: coroutines queue commands, and the thread runs them between steps. Outputs go
back to per-request asyncio queues with `call_soon_threadsafe`, one hand-off per step. The event loop never
waits on a step, and a step never waits on a client.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from valora.engine.llm_engine import EngineStats, LLMEngine, PromptType
from valora.lora.request import LoRARequest
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams
from valora.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an error; nothing more can be served."""


class QueueFullError(RuntimeError):
    """More requests are in flight than the running batch and the waiting queue may hold."""


class ClientDisconnectedError(Exception):
    """The client went away before its request finished; the request has been aborted."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_queued: int, metrics: ServerMetrics | None = None,
                 poll_interval: float = 0.5, admit: Callable[[LoRARequest], None] | None = None) -> None:
        """`admit(lora)` runs on the engine thread right before a request for that adapter is added; it may
        raise to refuse the request."""
        self.engine = engine
        self.admit = admit
        self.max_in_flight = engine.config.scheduler.max_num_seqs + max_queued
        self.metrics = metrics
        self.poll_interval = poll_interval
        self.stats: EngineStats = engine.stats()  # replaced (never mutated) by the engine thread
        self.error: BaseException | None = None
        self._commands: queue.SimpleQueue[tuple[Callable[[LLMEngine], Any], asyncio.Future | None]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle (called on the event loop) ------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="valora-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def check_capacity(self, new: int = 1) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        if self.num_in_flight + new > self.max_in_flight:
            raise QueueFullError(f"{self.num_in_flight} requests in flight; the server takes at most "
                                 f"{self.max_in_flight} (running batch plus waiting queue)")

    # -- commands -----------------------------------------------------------------------------------------
    def _submit(self, fn: Callable[[LLMEngine], Any], fut: asyncio.Future | None = None) -> None:
        self._commands.put((fn, fut))
        self._wake.set()

    async def call(self, fn: Callable[[LLMEngine], T]) -> T:
        """Run `fn(engine)` on the engine thread between steps; its result or exception comes back here."""
        if self.error is not None:
            raise EngineDeadError(f"the engine stopped: {self.error}")
        fut = self._loop.create_future()
        self._submit(fn, fut)
        return await fut

    def abort(self, request_id: str) -> None:
        self._submit(lambda engine: engine.abort_request(request_id))

    # -- requests -----------------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        lora: LoRARequest | None = None,
        arrival_time: float | None = None,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses (each carries the full text so far); the last one is
        finished. Leaving early, for any reason, aborts the request and frees its KV blocks."""
        self.check_capacity()
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = q
        finished = False
        try:
            await self.call(lambda engine: self._add(engine, request_id, prompt, params, lora, arrival_time))
            next_check = time.monotonic() + self.poll_interval
            while not finished:
                out = await self._next(q, self.poll_interval if is_disconnected else None)
                if is_disconnected is not None and time.monotonic() >= next_check:
                    if await is_disconnected():
                        raise ClientDisconnectedError()
                    next_check = time.monotonic() + self.poll_interval
                if out is not None:
                    finished = out.finished
                    yield out
        finally:
            del self._streams[request_id]
            if not finished:  # also when the add was cancelled while queued: the abort runs after it
                self.abort(request_id)

    def _add(self, engine: LLMEngine, request_id: str, prompt, params, lora, arrival_time) -> None:
        if lora is not None and self.admit is not None:
            self.admit(lora)
        engine.add_request(request_id, prompt, params, lora, arrival_time)

    @staticmethod
    async def _next(q: asyncio.Queue, timeout: float | None) -> RequestOutput | None:
        """The newest output (older ones are superseded: text is cumulative), the request's error, or None
        when `timeout` passes first."""
        try:
            item = await asyncio.wait_for(q.get(), timeout)
        except TimeoutError:
            return None
        while not q.empty() and not isinstance(item, BaseException) and not item.finished:
            item = q.get_nowait()
        if isinstance(item, BaseException):
            raise item
        return item

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
            if out.finished and self.metrics is not None:
                self.metrics.finished(out)

    def _fail_all(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine stopped: {error}")
        for q in self._streams.values():
            q.put_nowait(dead)

    # -- the engine thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping:
                self._wake.clear()
                self._run_commands()
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self.stats = self.engine.stats()
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
                    else:  # nothing could be scheduled this step; do not spin
                        self._wake.wait(0.005)
                else:
                    self.stats = self.engine.stats()
                    self._wake.wait()
        except BaseException as e:
            logger.exception("engine loop failed; the server cannot serve any more requests")
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)
            self._fail_commands(e)

    def _run_commands(self) -> None:
        while True:
            try:
                fn, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn(self.engine)
            except Exception as e:
                if fut is not None:
                    self._loop.call_soon_threadsafe(_settle, fut, None, e)
                else:
                    logger.warning("engine command failed: %s", e)
            else:
                if fut is not None:
                    self._loop.call_soon_threadsafe(_settle, fut, result, None)

    def _fail_commands(self, error: BaseException) -> None:
        dead = EngineDeadError(f"the engine stopped: {error}")
        while True:
            try:
                _, fut = self._commands.get_nowait()
            except queue.Empty:
                return
            if fut is not None:
                self._loop.call_soon_threadsafe(_settle, fut, None, dead)


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled (e.g. its client went away) while the command waited
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
