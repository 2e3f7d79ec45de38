"""`--scheduler` picks the orchestrator policy; `/metrics` shows each step's mode, time per mode and switches."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import openai

from tests.server.process import SERVED, series


def test_scheduler_flag_and_mode_metrics(start_server, adapters, server_model):
    server = start_server(["--lora-modules", f"hot={adapters['lora1']}", f"cold={adapters['lora2']}",
                           "--scheduler", "dlora", "--max-num-seqs", "4"])
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def burst():
        models = ["hot"] * 10 + ["cold"]  # dLoRA merges the adapter with the longest queue
        return await asyncio.gather(*[client.completions.create(model=m, prompt=f"a red car {i}", max_tokens=6,
                                                                temperature=0) for i, m in enumerate(models)])

    outs = asyncio.run(burst())
    assert all(o.choices[0].text is not None for o in outs)
    m = server.wait_idle()
    steps = series(m, "valora:mode_steps_total")
    assert steps[f'{{mode="merged",model_name="{SERVED}"}}'] > 0
    assert series(m, "valora:mode_switches_total")[f'{{model_name="{SERVED}"}}'] >= 1
    modes = series(m, "valora:inference_mode")
    assert sum(modes.values()) == 1 and all('scheduler="dlora"' in k for k in modes)


def test_unknown_scheduler_is_refused(server_model):
    r = subprocess.run([sys.executable, "-m", "valora.cli", "serve", str(server_model), "--scheduler", "fifo"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "invalid choice: 'fifo'" in r.stderr
