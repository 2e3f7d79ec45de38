"""The server's side of a run, read from its Prometheus `/metrics` while the client replays.

Polling gives the timeline (requests running and waiting, the mode of the last step, steps per mode between two
polls, switches) without any server change, and the same poller works on vLLM (`vllm:` names: queues only).
A step log inside the server would be exact per step, but polls every 100 ms already resolve the mode pattern at
the 10-50 ms step times of a 7B model, and cost the engine nothing: `/metrics` reads a snapshot the engine thread
publishes after each step.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import asdict, dataclass, field

import httpx

_LINE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_PREFIXES = ("valora:", "vllm:")


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format as (name, labels, value) triples."""
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m and not line.startswith("#"):
            out.append((m[1], dict(_LABEL.findall(m[2] or "")), float(m[3])))
    return out


def _find(series, name: str) -> list[tuple[dict[str, str], float]]:
    for prefix in _PREFIXES:
        hits = [(labels, v) for n, labels, v in series if n == prefix + name]
        if hits:
            return hits
    return []


@dataclass
class Sample:
    t: float  # seconds after the start of the run
    running: float | None
    waiting: float | None
    mode: str | None  # of the last step (VaLoRA only)
    hot_adapter: str | None
    mode_steps: dict[str, float] = field(default_factory=dict)  # cumulative
    mode_seconds: dict[str, float] = field(default_factory=dict)  # cumulative
    switches: float | None = None  # cumulative
    switch_seconds: float | None = None
    prompt_tokens: float | None = None  # cumulative, as the server counts them
    output_tokens: float | None = None
    pause_seconds: dict[str, float] = field(default_factory=dict)  # cumulative step-loop stalls, by cause

    @classmethod
    def from_text(cls, t: float, text: str) -> Sample:
        s = parse(text)

        def one(name: str) -> float | None:
            hits = _find(s, name)
            return sum(v for _, v in hits) if hits else None

        current = [labels for labels, v in _find(s, "inference_mode") if v == 1.0]
        return cls(
            t=t, running=one("num_requests_running"), waiting=one("num_requests_waiting"),
            mode=current[0].get("mode") if current else None,
            hot_adapter=(current[0].get("hot_adapter") or None) if current else None,
            mode_steps={labels["mode"]: v for labels, v in _find(s, "mode_steps_total")},
            mode_seconds={labels["mode"]: v for labels, v in _find(s, "mode_seconds_total")},
            switches=one("mode_switches_total"), switch_seconds=one("mode_switch_seconds_total"),
            prompt_tokens=one("prompt_tokens_total"), output_tokens=one("generation_tokens_total"),
            pause_seconds={labels["cause"]: v for labels, v in _find(s, "host_pause_seconds_total")},
        )

    def to_json(self) -> dict:
        return asdict(self)


async def scrape(http: httpx.AsyncClient, base_url: str, t0: float) -> Sample | None:
    """One sample, or None if the server has no `/metrics` (or it failed)."""
    try:
        r = await http.get(base_url.rstrip("/") + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    return Sample.from_text(time.perf_counter() - t0, r.text) if r.status_code == 200 else None


async def poll(base_url: str, t0: float, interval_s: float, stop: asyncio.Event) -> list[Sample]:
    """Samples every `interval_s` until `stop` is set, then one last one."""
    samples: list[Sample] = []
    async with httpx.AsyncClient() as http:
        while True:
            sample = await scrape(http, base_url, t0)
            if sample is not None:
                samples.append(sample)
            if stop.is_set():
                return samples
            with contextlib.suppress(asyncio.TimeoutError):  # noqa: UP041 (not the builtin before Python 3.11)
                await asyncio.wait_for(stop.wait(), interval_s)


async def wait_idle(base_url: str, timeout_s: float, interval_s: float = 0.1) -> bool:
    """Wait until the server reports nothing running or waiting (True), or `timeout_s` passes (False). A server
    without those metrics counts as idle: the client has already seen every response end."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while True:
            s = await scrape(http, base_url, 0.0)
            if s is None or not (s.running or s.waiting):
                return True
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(interval_s)


def mode_usage(samples: list[Sample], start_s: float) -> dict | None:
    """Time and steps per mode and switches between the first sample at or after `start_s` (the end of the
    warm-up) and the last one (after the drain); None when the server does not report modes."""
    after = [s for s in samples if s.t >= start_s and s.switches is not None]
    if len(after) < 2:
        return None
    a, b = after[0], after[-1]
    return {
        "seconds": {m: b.mode_seconds[m] - a.mode_seconds.get(m, 0.0) for m in b.mode_seconds},
        "steps": {m: int(b.mode_steps[m] - a.mode_steps.get(m, 0.0)) for m in b.mode_steps},
        "switches": int(b.switches - a.switches),
        "switch_seconds": (b.switch_seconds or 0.0) - (a.switch_seconds or 0.0),
        "pause_seconds": {c: b.pause_seconds[c] - a.pause_seconds.get(c, 0.0) for c in b.pause_seconds},
        "window_s": b.t - a.t,
    }


def token_totals(samples: list[Sample]) -> dict[str, float] | None:
    """Prompt and output tokens the server counted between the first and the last sample (a whole point: the first
    is taken before any request is sent, the last after the drain), to check the client's counts against."""
    have = [s for s in samples if s.output_tokens is not None]
    if len(have) < 2:
        return None
    return {"prompt": have[-1].prompt_tokens - have[0].prompt_tokens,
            "output": have[-1].output_tokens - have[0].output_tokens}
