"""`--vllm-compatible-metrics`: the metrics vLLM also has are exported under its `vllm:` names with its labels,
`vllm:lora_requests_info` exactly as vLLM's (what llm-d and the Gateway API Inference Extension read)."""

from __future__ import annotations

import argparse
import re
import time

from valora.bench.scrape import parse
from valora.engine.llm_engine import EngineStats
from valora.outputs import CompletionOutput, RequestMetrics, RequestOutput
from valora.server import cli
from valora.server.metrics import VLLM_NAMES, ServerMetrics


def _stats() -> EngineStats:
    return EngineStats(
        num_running=3, num_waiting=2, kv_cache_usage=0.25, running_adapters=["det", "cap"], waiting_adapters=["ocr"],
        resident_adapters=["det", "cap", "old"], max_loras=4, adapter_disk_loads=5, adapter_slot_loads=6,
        adapter_slot_evictions=1, adapter_host_evictions=0, adapter_slot_hits=9, adapter_blocking_loads=0,
        num_preemptions=1, prefix_cache_queries=10, prefix_cache_hits=4, image_cache_hits=2, image_cache_misses=3,
        scheduler="valora", mode="unmerged",
        hot_adapter=None, mode_steps={"unmerged": 7}, mode_seconds={"unmerged": 0.5}, num_switches=0,
        switch_seconds=0.0)


def _metrics(vllm_compatible: bool) -> list[tuple[str, dict[str, str], float]]:
    m = ServerMetrics("qwen", _stats, vllm_compatible=vllm_compatible)
    now = time.time()
    m.finished(RequestOutput("r0", "hi", [1, 2, 3], [CompletionOutput(0, "ok", [4, 5], finish_reason="length")],
                             finished=True, metrics=RequestMetrics(arrival_time=now - 1, first_scheduled_time=now - 0.9,
                                                                   first_token_time=now - 0.5, finished_time=now)))
    return parse(m.render().decode())


def test_vllm_names_only_when_asked():
    assert not [n for n, _, _ in _metrics(False) if n.startswith("vllm:")]
    series = _metrics(True)
    names = {n for n, _, _ in series}
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "lora_requests_info",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total", "request_success_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "time_to_first_token_seconds_count", "e2e_request_latency_seconds_bucket"):
        assert f"vllm:{name}" in names and f"valora:{name}" in names
    families = {re.sub(r"_(total|bucket|count|sum)$", "", n[5:]) for n in names if n.startswith("vllm:")}
    assert families == VLLM_NAMES
    assert "vllm:mode_steps_total" not in names and "vllm:lora_adapter_loads_total" not in names  # ours only


def test_lora_requests_info_as_vllm_exports_it():
    series = _metrics(True)
    (labels, value), = [(lab, v) for n, lab, v in series if n == "vllm:lora_requests_info"]
    assert labels == {"max_lora": "4", "running_lora_adapters": "det,cap", "waiting_lora_adapters": "ocr"}
    assert abs(value - time.time()) < 60  # vLLM's value: when it was set, so readers take the newest series
    by_name = {(n, tuple(sorted(lab.items()))): v for n, lab, v in series}
    assert by_name[("vllm:num_requests_waiting", (("model_name", "qwen"),))] == 2
    assert by_name[("vllm:request_success_total", (("finished_reason", "length"), ("model_name", "qwen")))] == 1
    assert by_name[("vllm:generation_tokens_total", (("model_name", "qwen"),))] == 2


def test_serve_flag():
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    assert p.parse_args(["m", "--vllm-compatible-metrics"]).vllm_compatible_metrics
    assert not p.parse_args(["m"]).vllm_compatible_metrics
