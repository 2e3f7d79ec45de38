"""`valora serve` in a subprocess, as users run it, and readers for its `/metrics`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from valora.server.launch import free_port

SERVED = "tiny-qwen2-vl"


class ServerProcess:
    """`valora serve` in a subprocess; its log is kept in a file for the tests to read."""

    def __init__(self, model: Path, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.api_key = api_key
        cmd = [sys.executable, "-m", "valora.cli", "serve", str(model), "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", SERVED, "--device", "cpu", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        env = {k: v for k, v in os.environ.items() if k != "VALORA_API_KEY"}
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """`/metrics` as {series: value}, fetched without following redirects (there must be none)."""
        r = httpx.get(f"{self.url}/metrics", timeout=10, follow_redirects=False)
        assert r.status_code == 200, r.text
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def wait_idle(self, timeout: float = 30.0) -> dict[str, float]:
        """Metrics once nothing runs or waits and the KV cache is empty (or fail with the last snapshot)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            busy = (gauge(m, "valora:num_requests_running") or gauge(m, "valora:num_requests_waiting")
                    or gauge(m, "valora:kv_cache_usage_perc") or gauge(m, "valora:lora_slots_active"))
            if not busy:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def gauge(metrics: dict[str, float], name: str) -> float:
    """The value of a metric with only the model_name label."""
    return metrics[f'{name}{{model_name="{SERVED}"}}']


def series(metrics: dict[str, float], name: str) -> dict[str, float]:
    """All series of one metric: {label text: value}."""
    return {k[len(name):]: v for k, v in metrics.items() if k.startswith(name + "{")}
