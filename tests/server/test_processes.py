"""`valora serve` as processes (issue 16): the engine core in its own process, several API-server processes in
front of it sharing its adapters, and a core that dies or cannot start is reported, never waited on."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil

from tests.server.process import SERVED
from valora.config import EngineConfig
from valora.engine.core_proc import CPU_CORE_NICE, core_cpu_threads


def chat(model: str = SERVED) -> dict:
    return {"model": model, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]}


def test_two_api_servers_share_one_core_and_its_adapters(start_server, adapters):
    server = start_server(["--api-server-count", "2", "--num-kv-blocks", "256"])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat(), timeout=60).status_code == 200
    r = httpx.post(f"{server.url}/v1/load_lora_adapter", json={"lora_name": "late",
                                                               "lora_path": str(adapters["lora0"])}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(_spawned(server.proc.pid)) == 3  # the core and two API servers
    for _ in range(12):  # a new connection each time, accepted by either API server: both know the adapter
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert "late" in {m["id"] for m in client.get("/v1/models").json()["data"]}
            assert client.post("/v1/chat/completions", json=chat("late")).status_code == 200
    for _ in range(4):  # whichever API server answers, the request-side series count all 13 requests
        m = server.metrics()
        assert m[f'valora:e2e_request_latency_seconds_count{{model_name="{SERVED}"}}'] == 13, m


def test_a_killed_core_gives_503_and_failing_health(start_server):
    server = start_server(["--num-kv-blocks", "256"])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat(), timeout=60).status_code == 200
    (core,) = _spawned(server.proc.pid)
    assert core.nice() == min(19, psutil.Process(server.proc.pid).nice() + CPU_CORE_NICE)  # below its front end
    core.kill()
    deadline = time.monotonic() + 30
    while httpx.get(f"{server.url}/health", timeout=10).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(), timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_serve_exits_non_zero_when_the_core_cannot_start(server_model, adapters, tmp_path):
    """An adapter whose config passes the checks before loading but whose weights are corrupt stops the core
    at start-up: `valora serve` says why and exits 1 instead of serving without it."""
    bad = tmp_path / "bad"
    shutil.copytree(adapters["lora0"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = subprocess.run([sys.executable, "-m", "valora.cli", "serve", str(server_model), "--device", "cpu",
                        "--lora-modules", f"bad={bad}", "--port", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "cannot start" in r.stderr, r.stderr[-2000:]


def test_core_threads_on_the_cpu_leave_a_core_to_each_api_server(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(8)), raising=False)
    assert core_cpu_threads(EngineConfig(model="m", device="cpu"), 1) == 7
    assert core_cpu_threads(EngineConfig(model="m", device="cpu"), 3) == 5
    assert core_cpu_threads(EngineConfig(model="m", device="cpu"), 8) == 1
    assert core_cpu_threads(EngineConfig(model="m", device="cuda"), 1) is None  # a GPU core keeps torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert core_cpu_threads(EngineConfig(model="m", device="cpu"), 1) is None  # the user's setting wins


def _spawned(pid: int) -> list[psutil.Process]:
    """The multiprocessing children `valora serve` started (its resource tracker aside)."""
    return [p for p in psutil.Process(pid).children()
            if any("spawn_main" in part for part in p.cmdline())]



def test_a_stopped_server_leaves_nothing_behind(start_server):
    """SIGTERM: the API server finishes (uvicorn then ends by the signal, as it was asked), the core is gone, and
    nothing is left for the resource tracker to report (the core's quick exit once left tqdm's semaphore behind:
    a warning at every shutdown), nor the core's socket file in the temporary directory."""
    server = start_server(["--num-kv-blocks", "256"])
    assert httpx.post(f"{server.url}/v1/chat/completions", json=chat(), timeout=60).status_code == 200
    (core,) = _spawned(server.proc.pid)
    sockets = f"{tempfile.gettempdir()}/valora-core-{server.proc.pid}-*"
    assert len(glob.glob(sockets)) == 1
    server.stop()
    assert glob.glob(sockets) == []
    log = server.log_text()
    assert server.proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in log, log[-2000:]
    assert _exited(core) and "leaked" not in log and "resource_tracker" not in log, log[-2000:]


def _exited(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE  # ended, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True
