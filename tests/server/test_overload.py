"""Issue 23, acceptance 3: 48 concurrent streams against `--max-num-seqs 8 --max-queued-requests 8`, 20 times over:
every request gets either a complete stream or a 503 with Retry-After before its stream starts, never an error
inside a stream, and the server is idle and serving afterwards."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx

from tests.server.process import SERVED, stream_outcome

STREAMS, ROUNDS = 48, 20


def test_48_streams_over_8_running_and_8_queued_end_or_get_503_before_streaming(start_server):
    server = start_server(["--max-num-seqs", "8", "--max-queued-requests", "8", "--num-kv-blocks", "512"])
    body = {"model": SERVED, "max_tokens": 6, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me about red cars."}]}

    async def round_of_streams() -> list[str]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(stream_outcome(client, body) for _ in range(STREAMS)))

    outcomes = Counter()
    for _ in range(ROUNDS):
        outcomes.update(asyncio.run(round_of_streams()))
        server.wait_idle()
    print(f"{ROUNDS} rounds of {STREAMS} streams: {dict(outcomes)}")
    assert set(outcomes) == {"ok", "busy"} and sum(outcomes.values()) == STREAMS * ROUNDS, outcomes
    assert outcomes["ok"] >= 16 * ROUNDS  # every round, at least the 8 running and the 8 queued were served
