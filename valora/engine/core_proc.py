"""The engine core's busy loop behind a ZeroMQ ROUTER socket, and how a server starts it: in a child process
(`valora serve`; spawned, so CUDA is never initialised before the fork) or on a thread of the caller's process
(tests, for a cheap start; same loop, same messages).

The loop takes every message that is waiting, then runs one engine step and sends each front end the outputs of
its own requests, one message per step. It blocks only when there is nothing to run. Adds are acknowledged
(accepted, or refused with the reason) before a front end starts a response; adapter loads and unloads are
broadcast to every front end, so all of them see the same adapter set. If the engine fails, every front end
gets a "dead" message and the process exits non-zero; a killed process is seen by the front ends' socket
monitors. The core exits when its parent goes away (its end of the start-up pipe closes).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import tempfile
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import zmq

from valora.config import EngineConfig, resolve_device
from valora.engine.core_host import CoreHost, CoreInfo
from valora.engine.ipc import decode, encode
from valora.errors import UserError

logger = logging.getLogger(__name__)

_METHODS = frozenset({"load_lora", "unload_lora", "pin_lora", "stats", "adapters"})
# A step that launched nothing while requests wait (adapters still loading, say) waits this long for a message.
# Only then: a step without outputs is no sign of that (the first step launched from idle collects nothing, and a
# step of prompt chunks samples nothing), and waiting after those delayed every burst of prompts.
_IDLE_WAIT_MS = 5


def serve_core(host: CoreHost, address: str, parent: Connection) -> None:
    """Run the core loop on `address` until `parent` says stop or closes."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.bind(address)
    loop = _CoreLoop(host, sock)
    parent.send(("ready", host.info()))
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(parent.fileno(), zmq.POLLIN)
    try:
        idle_wait: int | None = None
        while True:
            ready = dict(poller.poll(0 if host.has_work() and idle_wait is None else idle_wait))
            if parent.fileno() in ready:
                break  # "stop", or the parent is gone
            if sock in ready:
                loop.receive()
            loop.step()
            idle_wait = _IDLE_WAIT_MS if host.stalled() else None
    except Exception as e:
        logger.exception("engine core failed; front ends are told")
        loop.broadcast(("dead", f"the engine core stopped: {type(e).__name__}: {e}"))
        raise
    finally:
        sock.close()
        # ZeroMQ removes a bound ipc socket's file in its I/O thread, which the core's quick exit (`os._exit`)
        # never lets run: every stopped server left one in the temporary directory
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address.removeprefix("ipc://"))


@dataclass
class _CoreLoop:
    host: CoreHost
    sock: zmq.Socket
    clients: set[bytes] = field(default_factory=set)
    owner: dict[str, bytes] = field(default_factory=dict)  # core request id -> its front end

    def send(self, client: bytes, msg: tuple) -> None:
        self.sock.send_multipart([client, *encode(msg)], copy=False)

    def broadcast(self, msg: tuple) -> None:
        for client in self.clients:
            self.send(client, msg)

    def receive(self) -> None:
        while True:
            try:
                client, *frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.handle(client.bytes, decode(frames))

    def handle(self, client: bytes, msg: tuple) -> None:
        kind = msg[0]
        if kind == "hello":
            self.clients.add(client)
            self.send(client, ("info", self.host.info()))
        elif kind == "add":
            _, call_id, reqs = msg
            try:
                self.host.add(reqs)
            except Exception as e:
                self.send(client, ("ack", call_id, e))
                return
            for req in reqs:
                self.owner[req.request_id] = client
            self.send(client, ("ack", call_id, None))
        elif kind == "abort":
            ids = [i for i in msg[1] if self.owner.pop(i, None) is not None]
            self.host.abort(ids)
        elif kind == "call":
            _, call_id, method, args = msg
            value, error = None, None
            try:
                if method not in _METHODS:
                    raise ValueError(f"unknown engine core method {method!r}")
                value = getattr(self.host, method)(*args)
            except Exception as e:
                error = e
            if method == "load_lora" and error is None:
                self.broadcast(("adapter", value))
            elif method == "unload_lora" and error is None:
                event, value = value
                self.broadcast(("adapter", event))
            self.send(client, ("result", call_id, value, error))
        else:
            logger.warning("engine core: unknown message %r", kind)

    def step(self) -> None:
        """One engine step, its outputs sent."""
        if not self.host.has_work():
            return
        outputs = self.host.step()
        by_client: dict[bytes, list] = defaultdict(list)
        for out in outputs:
            client = self.owner.pop(out.request_id, None) if out.finished else self.owner.get(out.request_id)
            if client is not None:
                by_client[client].append(out)
        for client, outs in by_client.items():
            self.send(client, ("outputs", outs))


LogSetup = tuple[int, logging.Formatter | None]


def log_setup() -> LogSetup:
    """This process's logging, for a spawned child (which starts with none) to log the same way."""
    root = logging.getLogger()
    return root.getEffectiveLevel(), root.handlers[0].formatter if root.handlers else None


def apply_log_setup(setup: LogSetup) -> None:
    level, formatter = setup
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _core_main(config: EngineConfig, lora_modules: list[tuple[str, str]], max_in_flight: int | None, address: str,
               parent: Connection, log: LogSetup | None, cpu_threads: int | None = None) -> None:
    """The child process (or thread): build the engine, load the served adapters, say ready, serve."""
    from tqdm.auto import tqdm
    from tqdm.std import tqdm as tqdm_std

    from valora.engine.host_pauses import freeze_startup_heap
    from valora.engine.llm_engine import LLMEngine

    if log is not None:
        apply_log_setup(log)
    if multiprocessing.parent_process() is not None:
        # tqdm's default lock is a multiprocessing semaphore, which this process's quick exit (`os._exit` below)
        # would leave for the resource tracker to report as leaked at every shutdown; its bars need a thread lock
        tqdm_std.set_lock(threading.RLock())  # the base class: every tqdm flavour reads its lock from there
    if cpu_threads is not None:  # a core process on the CPU, beside its front ends
        import torch

        torch.set_num_threads(cpu_threads)
        with contextlib.suppress(OSError):
            os.nice(CPU_CORE_NICE)
    try:
        host = CoreHost(LLMEngine(config), max_in_flight)
        for name, path in tqdm(lora_modules, desc="Loading adapters", unit="adapter", disable=None):
            host.load_lora(name, path)
        freeze_startup_heap()  # a process of its own: what start-up built lives as long as it does
    except Exception as e:  # a model or adapter that cannot be served: the launcher says why and exits non-zero
        logger.exception("engine core failed to start")
        parent.send(("error", f"{type(e).__name__}: {e}"))
        raise SystemExit(1) from e
    try:
        serve_core(host, address, parent)
    finally:
        host.engine.shutdown()  # its tensor-parallel workers, if any
    if multiprocessing.parent_process() is not None:
        # A core process ends here, without the interpreter's finalisation: freeing the model's modules and tensors
        # one by one took 2 s of the parent's Ctrl-C on an idle 2-core box and 9 s beside two busy processes (the
        # core runs at nice 10 on the CPU). What must be written is: outputs sent, the step log flushed line by line.
        logging.shutdown()
        os._exit(0)


# A core process on the CPU runs at a lower priority than its front ends (nice 10: about a tenth of a contended
# core's share against theirs; no effect while cores are spare). Its model steps use the same cores as the front
# ends' request handling, and a step costs about the same however few sequences it holds: at equal priority the
# core stepped as soon as one request had arrived, so a burst of 64 took ~300 steps of one or two prompts each (the
# front end, starved, added them one by one), against ~15 steps when the front ends first hand over what they
# have. Server CPU per request fell from ~11 ms to ~4.5 (text) on the 2-core box.
CPU_CORE_NICE = 10


def core_cpu_threads(config: EngineConfig, front_ends: int) -> int | None:
    """torch's intra-op threads for a core process on the CPU beside `front_ends` busy API-server processes: the
    cores this process may use less one per front end (at least one), unless `OMP_NUM_THREADS` says; None (torch's
    default) on a GPU, where the host's ops are small. torch's default takes every core, and its OpenMP workers
    spin while they wait: beside front ends on few cores (2 on the test box) each model op's threads then fight the
    front end's for the same cores, which halved `valora serve`'s throughput with the tiny model."""
    try:
        on_cpu = resolve_device(config.device).type == "cpu"  # "auto" on a machine without CUDA included
    except UserError:  # a device this machine lacks: the core says so when it starts
        return None
    if not on_cpu or os.environ.get("OMP_NUM_THREADS"):
        return None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - front_ends)


class CoreProcess:
    """An engine core being started: its address, and once `wait_ready()` returned, its start-up `info`; `stop()`
    ends it. The caller may do its own start-up work (imports, the tokenizer) while the core loads. `in_thread`
    runs the same loop on a daemon thread of this process instead of a child process. `cpu_threads` sets the child
    process's torch intra-op threads (see `core_cpu_threads`; not for a thread, which shares this process's)."""

    def __init__(self, config: EngineConfig, lora_modules: list[tuple[str, str]] | None = None,
                 max_in_flight: int | None = None, in_thread: bool = False, cpu_threads: int | None = None) -> None:
        self.address = f"ipc://{tempfile.gettempdir()}/valora-core-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._conn, child_conn = multiprocessing.Pipe()
        args = (config, list(lora_modules or []), max_in_flight, self.address, child_conn,
                None if in_thread else log_setup(), None if in_thread else cpu_threads)
        if in_thread:
            self._worker = threading.Thread(target=_core_main, args=args, name="valora-core", daemon=True)
        else:
            # A daemonic process may not start children: a core with tensor-parallel workers is not one (it
            # still ends when its parent does: the loop stops when the parent's pipe closes)
            self._worker = multiprocessing.get_context("spawn").Process(
                target=_core_main, args=args, name="valora-core", daemon=config.tensor_parallel_size == 1)
        self._worker.start()
        if not in_thread:
            child_conn.close()
        self.info: CoreInfo | None = None

    def wait_ready(self, timeout_s: float = 600) -> CoreInfo:
        """The core's start-up info, once it serves; `RuntimeError` (the core stopped) if it could not start."""
        if self.info is not None:
            return self.info
        if not self._conn.poll(timeout_s):
            self.stop()
            raise RuntimeError(f"the engine core did not start within {timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self.stop()
            raise RuntimeError("the engine core exited during start-up (see the log above)") from None
        if kind == "error":
            self.stop()
            raise RuntimeError(f"the engine core could not start: {payload}")
        self.info = payload
        return payload

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def stop(self, timeout: float = 30) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._conn.send("stop")
        self._worker.join(timeout)
        if isinstance(self._worker, multiprocessing.process.BaseProcess) and self._worker.is_alive():
            self._worker.kill()
            self._worker.join()
        self._conn.close()
