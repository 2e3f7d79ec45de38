"""`--scheduler` picks the orchestrator policy; `/metrics` shows each step's mode, time per mode and switches, and
the `valora` policy's predicted against measured step time; `--step-log` records every step."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import openai
import pytest

from tests.server.process import SERVED, series
from valora.orchestrator.step_log import read_step_log


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


def test_step_log_and_cost_metrics(start_server, adapters, tmp_path):
    log = tmp_path / "steps.jsonl.gz"
    server = start_server(["--lora-modules", f"hot={adapters['lora1']}", f"cold={adapters['lora2']}",
                           "--max-num-seqs", "4", "--step-log", str(log)])
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    async def burst():
        models = ["hot"] * 8 + ["cold"] * 2
        return await asyncio.gather(*[client.completions.create(model=m, prompt=f"a red car {i}", max_tokens=6,
                                                                temperature=0) for i, m in enumerate(models)])

    asyncio.run(burst())
    m = server.wait_idle()
    steps = {k: v for k, v in series(m, "valora:mode_steps_total").items() if v}
    assert series(m, "valora:step_cost_steps_total") == steps  # the valora policy priced every step
    predicted = sum(series(m, "valora:step_cost_predicted_seconds_total").values())
    measured = sum(series(m, "valora:step_cost_measured_seconds_total").values())
    assert predicted > 0 and 0 < measured <= sum(series(m, "valora:mode_seconds_total").values())
    buckets = series(m, "valora:step_cost_ratio_bucket")
    assert sum(v for k, v in buckets.items() if 'le="+Inf"' in k) == sum(steps.values())
    pauses = {k.split('cause="')[1].split('"')[0]: v for k, v in series(m, "valora:host_pause_seconds_total").items()}
    assert set(pauses) == {"graph_capture", "gc", "kernel_compile"} and min(pauses.values()) >= 0
    assert pauses["graph_capture"] == 0.0  # no CUDA graphs on the CPU; start-up's own captures never count
    server.stop()  # the log is complete once the server has exited
    records = read_step_log(log)
    assert len(records) == sum(steps.values())
    assert sum(r.predicted_s for r in records) == pytest.approx(predicted)
    assert sum(r.num_tokens for r in records) == sum(sum(r.work.tokens.values()) for r in records) > 10 * 6
    assert {a for r in records for a in r.work.tokens} == {"hot", "cold"}
    assert all(r.costs and None in r.costs and r.compute_s > 0 and r.launch_s > 0 for r in records)
    assert any(r.decode for r in records) and any(not r.decode for r in records)


def test_unknown_scheduler_is_refused(server_model):
    r = subprocess.run([sys.executable, "-m", "valora.cli", "serve", str(server_model), "--scheduler", "fifo"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "invalid choice: 'fifo'" in r.stderr
