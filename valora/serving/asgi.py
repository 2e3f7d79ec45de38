"""The server's ASGI app driven in-process, without a socket: what a replica does with a forwarded request.

`AsgiApp.start()` runs the app's lifespan start-up (the engine front end connects to its core); `request()` runs
one HTTP exchange and yields, as they come, its status and headers (`Head`) and then its body chunks, so a stream
stays a stream. Closing the generator before the end is the client leaving: the app sees `http.disconnect`, as
under uvicorn, and aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.types import ASGIApp, Message


@dataclass(frozen=True)
class Forwarded:
    """One HTTP request as the front door received it."""

    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass(frozen=True)
class Head:
    status: int
    headers: list[tuple[bytes, bytes]]


class AsgiApp:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lifespan: asyncio.Task | None = None
        self._to_app: asyncio.Queue[Message] = asyncio.Queue()

    async def start(self) -> None:
        started: asyncio.Future = asyncio.get_running_loop().create_future()

        async def receive() -> Message:
            return await self._to_app.get()

        async def send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                started.set_result(None)
            elif message["type"] == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message", "start-up failed")))

        await self._to_app.put({"type": "lifespan.startup"})
        self._lifespan = asyncio.create_task(self.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive,
                                                      send))
        await started

    async def stop(self) -> None:
        if self._lifespan is not None:
            await self._to_app.put({"type": "lifespan.shutdown"})
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._lifespan, 30)

    async def request(self, req: Forwarded) -> AsyncIterator[Head | bytes]:
        out: asyncio.Queue[Message | None] = asyncio.Queue()
        gone = asyncio.Event()
        body_sent = False

        async def receive() -> Message:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await out.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await out.put(None)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": req.method,
                 "scheme": "http", "path": req.path, "raw_path": req.path.encode(), "root_path": "",
                 "query_string": req.query, "headers": req.headers, "client": ("127.0.0.1", 0),
                 "server": ("127.0.0.1", 0)}
        task = asyncio.create_task(run())
        try:
            while (message := await out.get()) is not None:
                if message["type"] == "http.response.start":
                    yield Head(message["status"], list(message.get("headers", [])))
                elif message["type"] == "http.response.body" and message.get("body"):
                    yield message["body"]
            await task
        finally:
            gone.set()
            if not task.done():
                with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(task, 10)
