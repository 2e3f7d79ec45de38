"""Start a server: the engine core in its own process, and the HTTP front end(s) that talk to it.

`serve` is `valora serve`: the core, then one API server in this process, or `api_server_count` of them in child
processes sharing the one listening socket. `LocalServer` runs the same pieces for the demo, benchmarks and tests,
with the HTTP front end on a background thread of this process.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and, with `limit_concurrency`, how many
connections and requests it takes before answering 503; it has no deadline for reading a request (its keep-alive
timer restarts with every byte received, and a fresh connection has none), so a client that sends half a request
and stalls holds its connection forever. `RequestDeadlines` adds the two deadlines to uvicorn's h11 protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from valora.config import EngineConfig
from valora.errors import UserError
from valora.server.logs import logger

if TYPE_CHECKING:  # the engine's modules import torch: only `serve` and `LocalServer` need them
    from valora.engine.core_host import CoreInfo
    from valora.engine.core_proc import CoreProcess, LogSetup


@dataclass
class ConnectionLimits:
    """What one connection may hold (the `valora serve` flags of the same names, in seconds)."""

    timeout_keep_alive: float = 5.0  # uvicorn's: an idle connection between requests is closed after this
    timeout_request_header: float = 10.0  # request line and headers, from connect (or the previous response)
    timeout_request_body: float = 60.0  # the whole body, from the end of the headers
    limit_concurrency: int | None = None  # connections (and requests) before uvicorn answers 503


class RequestDeadlines(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete `header_timeout`
    seconds after it opened (or after the previous response), or whose body is not complete `body_timeout`
    seconds after its headers. Once a request is read no deadline runs: a long stream is never cut."""

    def __init__(self, *args, header_timeout: float, body_timeout: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout, self.body_timeout = header_timeout, body_timeout
        self._phase: object = None  # h11's state of the client's side
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def _watch(self) -> None:
        """(Re)arm the deadline when the client's side of the connection enters a new phase."""
        phase = self.conn.their_state
        if phase is self._phase:
            return
        self._phase = phase
        self._cancel()
        timeout = {h11.IDLE: self.header_timeout, h11.SEND_BODY: self.body_timeout}.get(phase)
        if timeout is not None:
            self._deadline = self.loop.call_later(timeout, self._expire, phase)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self, phase: object) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        what = ("headers", self.header_timeout) if phase is h11.IDLE else ("body", self.body_timeout)
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
        logger.info("closed the connection of %s: request %s not received within %g s", peer, *what)
        self.transport.close()

def port_number(text: str) -> int:
    """argparse type of a `--port`."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: use a number from 0 to 65535")
    return port


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _config(app: ASGIApp, host: str, port: int, limits: ConnectionLimits) -> uvicorn.Config:
    # Our own logging config is kept (log_config=None); the server logs one line per request itself.
    protocol = functools.partial(RequestDeadlines, header_timeout=limits.timeout_request_header,
                                 body_timeout=limits.timeout_request_body)
    return uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5,
                          http=protocol, timeout_keep_alive=limits.timeout_keep_alive,
                          limit_concurrency=limits.limit_concurrency)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (as vLLM does): a port in use is found in milliseconds,
    not after minutes of loading weights, and nobody can take it meanwhile."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port or --host") from e
    sock.set_inheritable(True)
    return sock


def start_core(engine: EngineConfig, config, in_thread: bool = False) -> CoreProcess:
    """The engine core for a server of `config` (a `ServerConfig`), starting (it loads the model and adapters
    while the caller goes on: `wait_ready()` before using it). A core process on the CPU leaves a core to each
    API server (`core_cpu_threads`)."""
    from valora.engine.core_proc import CoreProcess, core_cpu_threads

    return CoreProcess(engine, config.lora_modules, config.max_in_flight(engine), in_thread=in_thread,
                       cpu_threads=core_cpu_threads(engine, config.api_server_count))


def front_end_threads() -> None:
    """An API-server process runs torch on one thread: its tensors are one request's (image pixels, positions),
    requests run side by side on the event loop and its worker threads, and the cores are the engine core's. With
    torch's default (a thread per core, spinning while it waits) every small op of every request woke workers
    that competed with the core process for the same cores. `OMP_NUM_THREADS`, when set, is kept."""
    if not os.environ.get("OMP_NUM_THREADS"):
        import torch

        torch.set_num_threads(1)


def serve(engine: EngineConfig, config, sock: socket.socket, limits: ConnectionLimits | None = None) -> int:
    """`valora serve` on a socket from `bind` until SIGINT / SIGTERM; the exit status (1 when the engine core
    could not start)."""
    limits = limits or ConnectionLimits()
    core = start_core(engine, config)
    from valora.server.app import build_app  # imported while the core loads

    front_end_threads()

    try:
        core.wait_ready()
    except RuntimeError as e:
        logger.error("cannot start: %s", e)
        return 1
    try:
        host, port = sock.getsockname()[:2]
        logger.info("serving on http://%s:%d (Ctrl-C stops)", f"[{host}]" if ":" in host else host, port)
        if config.api_server_count == 1:
            app = build_app(engine, core.address, core.info, config)
            uvicorn.Server(_config(app, host, port, limits)).run(sockets=[sock])
        else:
            _run_api_servers(engine, config, core, sock, limits)
    finally:
        core.stop()
    return 0


def _run_api_servers(engine: EngineConfig, config, core: CoreProcess, sock: socket.socket,
                     limits: ConnectionLimits) -> None:
    """`config.api_server_count` API-server processes accepting on `sock`; returns when one of them (or the core)
    ends, or on Ctrl-C / SIGTERM, after stopping the others. Their request-side metrics are summed through
    prometheus_client's multiprocess folder (see server/metrics.py), set before they import it."""
    import signal

    from valora.engine.core_proc import log_setup

    metrics_dir = tempfile.TemporaryDirectory(prefix="valora-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_api_server_main, name=f"valora-api-{i}",
                         args=(engine, config, core.address, core.info, sock, limits, log_setup()))
             for i in range(config.api_server_count)]
    for p in procs:
        p.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.is_set() and all(p.is_alive() for p in procs) and core.alive:
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(30)
        metrics_dir.cleanup()


def _api_server_main(engine: EngineConfig, config, core_address: str, core_info: CoreInfo, sock: socket.socket,
                     limits: ConnectionLimits, log: LogSetup) -> None:
    from valora.engine.core_proc import apply_log_setup
    from valora.server.app import build_app

    apply_log_setup(log)
    front_end_threads()
    host, port = sock.getsockname()[:2]
    uvicorn.Server(_config(build_app(engine, core_address, core_info, config), host, port, limits)).run(
        sockets=[sock])


class BackgroundServer:
    """`with BackgroundServer(app) as url: ...`: the real server on a free local port, stopped on exit."""

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int | None = None,
                 limits: ConnectionLimits | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        self.server = uvicorn.Server(_config(app, self.host, self.port, limits or ConnectionLimits()))
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


class LocalServer:
    """`with LocalServer(engine_config, server_config) as url: ...`: the engine core (a child process, or a thread
    with `in_thread`) and the HTTP front end on a background thread, on a free local port; stopped on exit."""

    def __init__(self, engine: EngineConfig, config, host: str = "127.0.0.1", port: int | None = None,
                 in_thread: bool = False) -> None:
        self.engine_config, self.config, self.in_thread = engine, config, in_thread
        self.host, self.port = host, port
        self.core: CoreProcess | None = None
        self.http: BackgroundServer | None = None

    def __enter__(self) -> str:
        from valora.server.app import build_app

        self.core = start_core(self.engine_config, self.config, self.in_thread)
        try:
            self.core.wait_ready()
            app = build_app(self.engine_config, self.core.address, self.core.info, self.config)
            self.http = BackgroundServer(app, self.host, self.port)
            return self.http.__enter__()
        except BaseException:
            self.core.stop()
            raise

    def __exit__(self, *exc) -> None:
        if self.http is not None:
            self.http.__exit__(*exc)
        if self.core is not None:
            self.core.stop()
