"""Ask the served models about held-out digits through the official `openai` client, all at once.

Queries are shuffled (seeded) before they are sent, so every batch the engine runs mixes the base model and
all adapters: what the demo shows is heterogeneous multi-LoRA batching, not one adapter after another.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from PIL import Image

from valora.demo.tasks import Task
from valora.multimodal.chat import image_data_url


@dataclass(frozen=True)
class Query:
    task: Task
    model: str  # the served name: the base model's or an adapter's
    image: int  # index into the held-out images


@dataclass(frozen=True)
class Reply:
    query: Query
    text: str
    latency: float  # seconds from sending to the full answer


async def _ask_all(base_url: str, queries: list[Query], urls: list[str], concurrency: int) -> list[Reply]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)

    async def ask(q: Query) -> Reply:
        async with gate:
            t0 = time.perf_counter()
            r = await client.chat.completions.create(
                model=q.model, messages=q.task.messages(urls[q.image]), temperature=0, max_tokens=8)
            return Reply(q, (r.choices[0].message.content or "").strip(), time.perf_counter() - t0)

    async with client:
        return list(await asyncio.gather(*(ask(q) for q in queries)))


def ask_all(base_url: str, queries: list[Query], images: list[Image.Image], concurrency: int = 128,
            seed: int = 0) -> list[Reply]:
    """Replies in the order of `queries` (they are sent in a shuffled order)."""
    urls = [image_data_url(img) for img in images]
    order = list(range(len(queries)))
    random.Random(seed).shuffle(order)
    replies = asyncio.run(_ask_all(base_url, [queries[i] for i in order], urls, concurrency))
    by_query = dict(zip(order, replies))
    return [by_query[i] for i in range(len(queries))]
