"""`valora serve` in a subprocess, as users run it, and readers for its `/metrics`."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from valora.bench.server import ServeProcess

SERVED = "tiny-qwen2-vl"


class ServerProcess(ServeProcess):
    """The tests' server: the tiny model on the CPU under SERVED, optionally behind an API key."""

    def __init__(self, model: Path, args: list[str], log_path: Path, api_key: str | None = None) -> None:
        key = ["--api-key", api_key] if api_key else []
        # Two processes import torch at start-up (the engine core and the front end): on a busy 2-core box that
        # takes minutes, on a quiet one seconds.
        super().__init__(model, ["--served-model-name", SERVED, "--device", "cpu", *args, *key], log_path,
                         startup_timeout_s=300)
        self.api_key = api_key

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

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


def gauge(metrics: dict[str, float], name: str) -> float:
    """The value of a metric with only the model_name label."""
    return metrics[f'{name}{{model_name="{SERVED}"}}']


def series(metrics: dict[str, float], name: str) -> dict[str, float]:
    """All series of one metric: {label text: value}."""
    return {k[len(name):]: v for k, v in metrics.items() if k.startswith(name + "{")}


async def stream_outcome(client: httpx.AsyncClient, body: dict) -> str:
    """One streamed chat completion under load (issue 23): "ok" when it streams to [DONE] without an error event,
    "busy" when it is refused with 503 and Retry-After before the stream starts; anything else fails."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            return "busy"
        assert r.status_code == 200
        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and not any('"error"' in line for line in lines), lines
        return "ok"
