"""`valora demo [--serve]`: multi-LoRA vision serving on a fresh machine, with nothing downloaded.

1. Real handwritten digits from scikit-learn; a tiny Qwen2-VL trained to name them, and one LoRA adapter per
   further task (odd or even, the digit plus one, the digit as a word), cached after the first run.
2. The real server on a free local port, the base model and every adapter behind one engine.
3. Every held-out digit sent to the base model and each adapter through the official `openai` client,
   concurrently and shuffled, so each batch mixes adapters; a table of accuracy and latency per task.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from pathlib import Path

from valora.server.launch import port_number

SERVED_NAME = "qwen2-vl-digits"
MIN_ACCURACY = 0.9


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--serve", action="store_true", help="keep the server up afterwards and print how to query it")
    p.add_argument("--host", default="127.0.0.1", help="address for the server (default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=None, help="port for the server (default: a free one)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="where the trained model and adapters are kept (default: $VALORA_CACHE_DIR, else "
                        "~/.cache/valora)")
    p.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    p.add_argument("--concurrency", type=int, default=128, metavar="N",
                   help="requests in flight at once (default: 128)")


def _quiet() -> None:
    """The demo prints a table, not library chatter; errors still show."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("valora", "uvicorn", "httpx", "httpx2", "openai"):  # openai 3.x logs each request via httpx2
        logging.getLogger(name).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from valora.config import CacheConfig, EngineConfig, LoRAConfig, SchedulerConfig
    from valora.demo import artifacts
    from valora.demo.client import Query, ask_all
    from valora.demo.data import load_digits, split
    from valora.demo.report import render, score
    from valora.server.app import ServerConfig
    from valora.server.launch import LocalServer

    _quiet()
    t0 = time.perf_counter()
    recipe = artifacts.DemoRecipe()
    cache = args.cache_dir or artifacts.cache_dir()
    train, test = split(load_digits(recipe.model.image_size), recipe.test_fraction, recipe.split_seed)
    built = None if args.retrain else artifacts.cached(recipe, cache)
    if built is None:
        print(f"Training a tiny Qwen2-VL and {len(recipe.adapter_tasks)} LoRA adapters on {len(train)} real "
              f"handwritten digits (scikit-learn); cached in {cache} for the next run.", flush=True)
        built = artifacts.build(recipe, cache, train)
    else:
        print(f"Using the model and adapters cached in {built.root}", flush=True)
    samples = _save_samples(built.root / "samples", test)

    engine = EngineConfig(
        model=str(built.base), enable_lora=True, lora=LoRAConfig(max_loras=len(recipe.adapter_tasks)),
        cache=CacheConfig(num_blocks=2048), scheduler=SchedulerConfig(max_num_seqs=256),
    )
    config = ServerConfig(served_model_names=[SERVED_NAME],
                          lora_modules=[(name, str(path)) for name, path in built.adapters.items()],
                          allowed_local_media_path=samples)
    tasks = [recipe.base_task, *recipe.adapter_tasks]
    queries = [Query(recipe.base_task, SERVED_NAME, i) for i in range(len(test))]
    for task in recipe.adapter_tasks:  # each adapter on its task, and the base model asked the same question
        queries += [Query(task, task.name, i) for i in range(len(test))]
        queries += [Query(task, SERVED_NAME, i) for i in range(len(test))]

    server = LocalServer(engine, config, args.host, args.port)
    with server as url:
        print(f"Server up at {url}: base model {SERVED_NAME!r} and adapters "
              f"{', '.join(repr(t.name) for t in recipe.adapter_tasks)}. Sending {len(queries)} requests "
              f"({len(test)} held-out digits x {len(tasks) * 2 - 1} task/model pairs), adapters mixed...", flush=True)
        t1 = time.perf_counter()
        replies = ask_all(url, queries, test.images, args.concurrency)
        elapsed = time.perf_counter() - t1
        rows = score(replies, test.labels, SERVED_NAME)
        print()
        print(render(rows))
        print(f"\n{len(queries)} requests in {elapsed:.1f} s ({len(queries) / elapsed:.0f} req/s) on one engine; "
              f"total {time.perf_counter() - t0:.0f} s. The base model only names the digit: asked an adapter's "
              "question, it still answers with the digit.")
        failed = [r for r in rows if r.accuracy < MIN_ACCURACY]
        for r in failed:
            print(f"FAILED: {r.model!r} ({r.task.summary}) is below {MIN_ACCURACY:.0%} held-out accuracy",
                  file=sys.stderr)
        if args.serve:
            _serve_forever(url, samples, recipe)
    return 1 if failed else 0


def _save_samples(folder: Path, test) -> Path:
    """A few held-out digits as PNG files, for trying the server with `curl` (local files under this folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()
    for img, label in zip(test.images, test.labels):
        if label not in seen:
            img.save(folder / f"digit-{label}.png")
            seen.add(label)
    return folder


def _serve_forever(url: str, samples: Path, recipe) -> None:
    logging.getLogger("valora").setLevel(logging.INFO)  # from now on, one log line per request
    task = recipe.adapter_tasks[0]
    image = (samples / "digit-7.png").resolve()
    pairs = [(SERVED_NAME, recipe.base_task.question), *((t.name, t.question) for t in recipe.adapter_tasks)]
    print(f"""
The server keeps running at {url} (Ctrl-C stops it): base model {SERVED_NAME!r}, adapters \
{", ".join(repr(t.name) for t in recipe.adapter_tasks)}. Sample digits to try: {samples}

# the models
curl {url}/v1/models

# one adapter, one sample digit (local files under the samples folder are allowed)
curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{{
  "model": "{task.name}", "max_tokens": 8, "temperature": 0,
  "messages": [{{"role": "user", "content": [
    {{"type": "image_url", "image_url": {{"url": "file://{image}"}}}},
    {{"type": "text", "text": "{task.question}"}}]}}]}}'

# every model through the openai client, the image sent as a data: URL
python - <<'EOF'
import base64, openai
client = openai.OpenAI(base_url="{url}/v1", api_key="unused")
image = {{"url": "data:image/png;base64," + base64.b64encode(open("{image}", "rb").read()).decode()}}
for model, question in {pairs!r}:
    content = [{{"type": "image_url", "image_url": image}}, {{"type": "text", "text": question}}]
    r = client.chat.completions.create(model=model, messages=[{{"role": "user", "content": content}}],
                                       temperature=0, max_tokens=8)
    print(f"{{model:>16}}: {{question:<30}} -> {{r.choices[0].message.content}}")
EOF

# Prometheus metrics
curl -s {url}/metrics | grep '^valora:'
""", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("stopping")
