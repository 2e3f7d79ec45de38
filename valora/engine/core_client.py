"""`CoreClient`: a front end's asyncio connection to the engine core (`engine/core_proc.py`).

Adds wait for the core's acknowledgement, so a refusal (queue full, adapter gone, a request that can never fit)
reaches the caller before any response starts. Utility calls (adapter loads, stats) return the core's result.
Outputs, adapter events and the core's death arrive through callbacks on the event loop. The core is taken for
dead when it says so or when its socket disconnects (a killed process); from then on every call raises
`EngineDeadError` at once, and nothing waits forever.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from valora.engine.core_host import AdapterEvent, CoreInfo
from valora.engine.errors import EngineDeadError
from valora.engine.ipc import decode, encode
from valora.engine.request import EngineCoreOutput, EngineCoreRequest

logger = logging.getLogger(__name__)


class CoreClient:
    def __init__(self, address: str, on_outputs: Callable[[list[EngineCoreOutput]], None],
                 on_adapter: Callable[[AdapterEvent], None], on_dead: Callable[[EngineDeadError], None]) -> None:
        self.address = address
        self.on_outputs, self.on_adapter, self.on_dead = on_outputs, on_adapter, on_dead
        self.error: EngineDeadError | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._tasks: list[asyncio.Task] = []
        self._sock: zmq.asyncio.Socket | None = None

    async def start(self, timeout_s: float = 60) -> CoreInfo:
        """Connect and introduce this front end; the core's current info (adapters included)."""
        ctx = zmq.asyncio.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.IDENTITY, f"fe-{os.getpid()}-{id(self):x}".encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._sock.connect(self.address)
        fut = self._future(0)
        self._tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch(monitor))]
        await self._send(("hello",))
        return await asyncio.wait_for(fut, timeout_s)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close()

    # -- calls ----------------------------------------------------------------------------------------------
    async def add(self, reqs: list[EngineCoreRequest]) -> None:
        """Queue one API call's requests in the core; raises the core's refusal."""
        call_id = next(self._ids) + 1
        fut = self._future(call_id)
        await self._send(("add", call_id, reqs))
        await fut

    def abort(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        if ids and self.error is None:
            asyncio.ensure_future(self._send(("abort", ids)))

    async def call(self, method: str, *args: Any) -> Any:
        """`CoreHost.<method>(*args)` in the core, between two steps."""
        call_id = next(self._ids) + 1
        fut = self._future(call_id)
        await self._send(("call", call_id, method, args))
        return await fut

    def _future(self, call_id: int) -> asyncio.Future:
        if self.error is not None:
            raise self.error
        fut = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        fut.add_done_callback(lambda _: self._pending.pop(call_id, None))
        return fut

    async def _send(self, msg: tuple) -> None:
        await self._sock.send_multipart(encode(msg), copy=False)

    # -- incoming -------------------------------------------------------------------------------------------
    async def _receive(self) -> None:
        while True:
            msg = decode(await self._sock.recv_multipart(copy=False))
            kind = msg[0]
            if kind == "outputs":
                self.on_outputs(msg[1])
            elif kind == "info":
                self._settle(0, msg[1], None)
            elif kind == "ack":
                self._settle(msg[1], None, msg[2])
            elif kind == "result":
                self._settle(msg[1], msg[2], msg[3])
            elif kind == "adapter":
                self.on_adapter(msg[1])
            elif kind == "dead":
                self._die(msg[1])

    def _settle(self, call_id: int, value: Any, error: BaseException | None) -> None:
        fut = self._pending.get(call_id)
        if fut is None or fut.done():  # its caller went away meanwhile
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        connected = False
        try:
            while True:
                event = (await recv_monitor_message(monitor))["event"]
                if event == zmq.EVENT_CONNECTED:
                    connected = True
                elif event == zmq.EVENT_DISCONNECTED and connected:
                    self._die("the engine core process exited")
                    return
        finally:
            monitor.close()

    def _die(self, message: str) -> None:
        if self.error is not None:
            return
        self.error = EngineDeadError(message)
        logger.error("%s; requests fail from now on", message)
        for fut in list(self._pending.values()):
            if not fut.done():
                fut.set_exception(self.error)
        self.on_dead(self.error)
