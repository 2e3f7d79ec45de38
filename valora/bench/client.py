"""Open-loop replay of a workload against any OpenAI-compatible server, streaming, one record per request.

Requests go out at their scheduled arrival times whatever the server's state (open loop), so queueing shows up
as latency. All latencies are measured from the scheduled arrival, so a client held back by its own concurrency
bound counts that wait too. Token counts come from the stream's `usage` (`stream_options.include_usage`, and
`continuous_usage_stats` where the server has it, so the first token is timed even when it adds no text: a
random-weight model's tokens often decode to nothing); the
server's own queue time comes from the `metrics` object VaLoRA adds to the last chunk (absent on other servers).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from valora.bench.images import VIDEO_FPS, data_url, video_url
from valora.bench.workload import Request


@dataclass
class Record:
    """One request's outcome; times are seconds after the start of the run."""

    index: int
    task: str
    adapter: str
    warmup: bool
    images: int
    expected_output_tokens: int
    scheduled_s: float
    status: str = "timeout"  # "ok", "error", or "timeout" (still running at the run's time limit, then aborted)
    sent_s: float | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    prompt_tokens: int | None = None  # as the server counts them: text, template and image tokens
    output_tokens: int | None = None
    queue_time_s: float | None = None  # server-reported: arrival to first scheduled step
    http_status: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def latency_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.scheduled_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.scheduled_s

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first (None for one-token answers)."""
        if self.finished_s is None or self.first_token_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.finished_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def per_token_s(self) -> float | None:
        """The paper's per-token latency: end-to-end latency over prompt (image tokens included) plus output."""
        if self.latency_s is None or self.prompt_tokens is None or self.output_tokens is None:
            return None
        return self.latency_s / max(1, self.prompt_tokens + self.output_tokens)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "latency_s": self.latency_s, "ttft_s": self.ttft_s, "tpot_s": self.tpot_s,
                "per_token_s": self.per_token_s}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Record:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def chat_body(req: Request) -> dict[str, Any]:
    """The request as an OpenAI chat completion; the output length is enforced as in vLLM. A video request's
    frames go as one clip, sampled by the server at the rate it was made at (every frame)."""
    extra = {}
    if req.video:
        content = [{"type": "video_url", "video_url": {"url": video_url(req.images)}}]
        extra["media_io_kwargs"] = {"video": {"fps": VIDEO_FPS, "num_frames": len(req.images)}}
    else:
        content = [{"type": "image_url", "image_url": {"url": data_url(ref)}} for ref in req.images]
    content.append({"type": "text", "text": req.prompt})
    return {"model": req.adapter, "messages": [{"role": "user", "content": content}],
            "max_tokens": req.output_tokens, "min_tokens": req.output_tokens, "ignore_eos": True, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}, **extra}


@dataclass(frozen=True)
class ClientConfig:
    base_url: str  # up to the /v1, e.g. http://127.0.0.1:8000
    time_limit_s: float  # hard limit from the start of the run; whatever still runs then is aborted
    max_concurrency: int = 512
    api_key: str | None = None


async def replay(requests: list[Request], config: ClientConfig, t0: float,
                 on_done: Callable[[Record], None] | None = None) -> list[Record]:
    """Send every request at `t0` (a `time.perf_counter()` value) plus its arrival time; return one record per
    request, in order, once all finished or the time limit passed. It never waits beyond the limit."""
    records = [Record(r.index, r.task, r.adapter, r.warmup, len(r.images), r.output_tokens, r.arrival_s)
               for r in requests]
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
    gate = asyncio.Semaphore(config.max_concurrency)
    url = config.base_url.rstrip("/") + "/v1/chat/completions"
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=httpx.Timeout(None, connect=30)) as http:

        async def one(req: Request, rec: Record) -> None:
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            async with gate:
                body = json.dumps(chat_body(req))
                rec.sent_s = time.perf_counter() - t0
                try:
                    await _stream(http, url, body, rec, t0)
                except Exception as e:  # a transport error or a malformed stream: this request failed, not the run
                    rec.status, rec.error = "error", f"{type(e).__name__}: {e}"
            if on_done is not None:
                on_done(rec)

        tasks = [asyncio.create_task(one(req, rec)) for req, rec in zip(requests, records)]
        remaining = t0 + config.time_limit_s - time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=max(0.0, remaining))
        for t in pending:  # their records keep status "timeout"; closing the stream makes the server abort them
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return records


async def _stream(http: httpx.AsyncClient, url: str, body: str, rec: Record, t0: float) -> None:
    async with http.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as r:
        rec.http_status = r.status_code
        if r.status_code != 200:
            rec.status, rec.error = "error", (await r.aread()).decode(errors="replace")[:500]
            rec.finished_s = time.perf_counter() - t0
            return
        chunks = 0
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            obj = json.loads(data)
            now = time.perf_counter() - t0
            if "error" in obj:
                rec.status, rec.error, rec.finished_s = "error", str(obj["error"])[:500], now
                return
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                if delta.get("content") or choice.get("text") or choice.get("finish_reason"):
                    chunks += 1
                    if rec.first_token_s is None:
                        rec.first_token_s = now
            if obj.get("usage"):
                rec.prompt_tokens = obj["usage"].get("prompt_tokens")
                rec.output_tokens = obj["usage"].get("completion_tokens")
                # continuous usage (vLLM, VaLoRA): the first token counts even when it adds no text yet
                if rec.output_tokens and rec.first_token_s is None:
                    rec.first_token_s = now
            if (obj.get("metrics") or {}).get("queue_time") is not None:
                rec.queue_time_s = obj["metrics"]["queue_time"]
        rec.finished_s = time.perf_counter() - t0
        if rec.output_tokens is None:  # a server without usage in streams: one chunk per token, as most send
            rec.output_tokens = chunks
        rec.status = "ok"
