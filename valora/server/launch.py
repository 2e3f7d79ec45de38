"""Run the app with uvicorn: in the foreground (`valora serve`), or on a background thread (the demo)."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from starlette.types import ASGIApp


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    # Our own logging config is kept (log_config=None); the server logs one line per request itself.
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5)


def serve(app: ASGIApp, host: str, port: int) -> None:
    uvicorn.Server(_config(app, host, port)).run()


class BackgroundServer:
    """`with BackgroundServer(app) as url: ...`: the real server on a free local port, stopped on exit."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(_config(app, self.host, self.port))
        self.thread = threading.Thread(target=self.server.run, name="valora-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
