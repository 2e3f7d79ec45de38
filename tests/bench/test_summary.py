"""Metrics from records worked out by hand, the SLO rules, /metrics parsing and the results directory round trip."""

from __future__ import annotations

import gzip

import pytest

from valora.bench.client import Record
from valora.bench.report import comparisons, explain
from valora.bench.results import Point, PointKey, load_points, save_point, summary_rows
from valora.bench.scrape import Sample, mode_usage, parse, token_totals
from valora.bench.summary import SLO, max_rate_within_slo, summarize


def rec(i: int, scheduled: float, first: float | None, finished: float | None, out: int = 5, prompt: int = 15,
        status: str = "ok", warmup: bool = False) -> Record:
    return Record(i, "vqa", "a0", warmup, 1, out, scheduled, status=status, sent_s=scheduled, first_token_s=first,
                  finished_s=finished, prompt_tokens=prompt, output_tokens=out)


def test_summary_by_hand():
    records = [
        rec(0, 0.0, 0.2, 0.6, warmup=True),  # left out
        rec(1, 1.0, 1.1, 1.5),  # latency 0.5, ttft 0.1, tpot 0.1, per token 0.025
        rec(2, 2.0, 2.5, 3.0, out=3),  # latency 1.0, ttft 0.5, tpot 0.25
        rec(3, 3.0, 3.2, 5.0, out=1),  # latency 2.0, one token: no tpot
        rec(4, 4.0, None, 4.5, status="error"),
        rec(5, 4.5, None, None, status="timeout"),
    ]
    s = summarize(records, SLO(latency_s=1.0, ttft_s=0.4))
    assert (s["requests"], s["warmup"], s["measured"], s["ok"], s["errors"], s["timeouts"]) == (6, 1, 5, 3, 1, 1)
    assert s["latency_s"]["mean"] == pytest.approx(3.5 / 3) and s["latency_s"]["p50"] == pytest.approx(1.0)
    assert s["latency_s"]["p99"] == pytest.approx(1.98)  # linear interpolation between 1.0 and 2.0
    assert s["ttft_s"]["mean"] == pytest.approx(0.8 / 3)
    assert s["tpot_s"]["mean"] == pytest.approx((0.1 + 0.25) / 2)
    assert s["per_token_s"]["p50"] == pytest.approx(1.0 / 18)
    assert s["duration_s"] == pytest.approx(4.0)  # first measured arrival 1.0 to last finish 5.0
    assert s["throughput_rps"] == pytest.approx(3 / 4) and s["output_tps"] == pytest.approx(9 / 4)
    assert s["slo_attainment"] == pytest.approx(1 / 5)  # only request 1 meets both bounds; failures count as misses
    assert s["goodput_rps"] == pytest.approx(1 / 4)
    assert s["queue_time_s"]["mean"] is None  # not reported by this (imaginary) server


def test_max_rate_needs_every_lower_rate():
    assert max_rate_within_slo([(2, 1.0), (4, 0.95), (8, 0.5), (16, 0.99)], 0.9) == 4
    assert max_rate_within_slo([(2, 0.5), (4, 1.0)], 0.9) is None
    assert max_rate_within_slo([(4, 0.9), (2, 1.0)], 0.9) == 4


METRICS = """# HELP valora:num_requests_running Sequences in the running batch.
valora:num_requests_running{model_name="m"} 3.0
valora:num_requests_waiting{model_name="m"} 7.0
valora:lora_requests_info{max_lora="8",running_lora_adapters="a,b",waiting_lora_adapters=""} 1.7e+09
valora:inference_mode{hot_adapter="a",mode="unmerged",model_name="m",scheduler="valora"} 0.0
valora:inference_mode{hot_adapter="a",mode="merged",model_name="m",scheduler="valora"} 1.0
valora:mode_steps_total{mode="unmerged",model_name="m"} 10.0
valora:mode_steps_total{mode="merged",model_name="m"} 4.0
valora:mode_seconds_total{mode="unmerged",model_name="m"} 0.5
valora:mode_seconds_total{mode="merged",model_name="m"} 0.1
valora:mode_switches_total{model_name="m"} 2.0
valora:mode_switch_seconds_total{model_name="m"} 0.02
valora:prompt_tokens_total{model_name="m"} 100.0
valora:generation_tokens_total{model_name="m"} 40.0
valora:host_pause_seconds_total{cause="graph_capture",model_name="m"} 0.25
valora:host_pause_seconds_total{cause="gc",model_name="m"} 0.01
"""


def test_metrics_parsing_and_deltas():
    assert ("valora:lora_requests_info", {"max_lora": "8", "running_lora_adapters": "a,b",
                                          "waiting_lora_adapters": ""}, 1.7e9) in parse(METRICS)
    a = Sample.from_text(1.0, METRICS)
    assert (a.running, a.waiting, a.mode, a.hot_adapter, a.switches) == (3, 7, "merged", "a", 2)
    b = Sample.from_text(5.0, METRICS.replace("} 10.0", "} 30.0").replace("} 2.0", "} 5.0").replace("} 40.0", "} 90.0")
                         .replace("} 0.25", "} 1.75"))
    before = Sample(0.0, 0, 0, None, None, {}, {}, 0.0, 0.0, 0.0, 0.0)
    usage = mode_usage([before, a, b], start_s=0.5)
    assert usage["steps"] == {"unmerged": 20, "merged": 0} and usage["switches"] == 3
    assert usage["window_s"] == 4.0 and usage["pause_seconds"] == {"graph_capture": 1.5, "gc": 0.0}
    assert token_totals([before, a, b]) == {"prompt": 100.0, "output": 90.0}
    vllm = Sample.from_text(0.0, 'vllm:num_requests_running{model_name="x"} 2.0\n')
    assert (vllm.running, vllm.mode, mode_usage([vllm, vllm], 0.0)) == (2, None, None)


def test_results_round_trip(tmp_path):
    key = PointKey("vqa", "zipf1", "valora", 2.0)
    records = [rec(0, 0.0, 0.1, 0.5), rec(1, 0.5, None, None, status="timeout")]
    samples = [Sample(0.0, 1, 0, "merged", "a0", {"merged": 1.0}, {"merged": 0.1}, 0.0, 0.0, 10.0, 2.0)]
    save_point(tmp_path, Point(key, records, samples, {"modes": None, "warmup_s": 0.0}))
    (loaded,) = load_points(tmp_path)
    assert (loaded.key, loaded.records, loaded.samples) == (key, records, samples)
    row = summary_rows([loaded], SLO())[0]
    peer = {**row, "policy": "slora", "latency_s": {**row["latency_s"], "mean": 1.0}, "slo_attainment": 0.5}
    (c,) = comparisons([row, peer], SLO())
    assert c["ratio"] == pytest.approx(0.5) and c["baseline"] == "slora" and not c["baseline_unsaturated"]


def test_point_logs_are_gzipped_and_earlier_plain_logs_still_read(tmp_path):
    """A point's request and timeline logs are written gzipped, the same bytes for the same rows (a re-run that
    changes nothing changes no committed file); a results directory from before, with plain .jsonl, loads alike."""
    key = PointKey("vqa", "zipf1", "valora", 2.0)
    records = [rec(i, 0.1 * i, 0.1 * i + 0.05, 0.1 * i + 0.5) for i in range(50)]
    samples = [Sample(0.0, 1, 0, "merged", "a0", {"merged": 1.0}, {"merged": 0.1}, 0.0, 0.0, 10.0, 2.0)]
    save_point(tmp_path, Point(key, records, samples, {"modes": None}))
    logs = sorted(p.name for p in (tmp_path / "points").iterdir())
    assert logs == [f"{key.stem}.json", f"{key.stem}.requests.jsonl.gz", f"{key.stem}.timeline.jsonl.gz"]
    first = (tmp_path / "points" / f"{key.stem}.requests.jsonl.gz").read_bytes()
    save_point(tmp_path, Point(key, records, samples, {"modes": None}))
    assert (tmp_path / "points" / f"{key.stem}.requests.jsonl.gz").read_bytes() == first
    for name in logs[1:]:  # as an earlier run left them
        gz = tmp_path / "points" / name
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    (loaded,) = load_points(tmp_path)
    assert (loaded.records, loaded.samples) == (records, samples)


def test_a_miss_explained_from_the_records():
    """valora 0.8x slora's mean latency with slora within the SLO: the report says how much of the difference is
    before the first token and how much decoding, the waiting queues after the warm-up, and valora's modes."""
    def point(policy: str, first: float, finished: float, waiting: float, modes: dict | None) -> Point:
        records = [rec(i, float(i), i + first, i + finished) for i in range(4)]
        samples = [Sample(t, 1, w, None, None) for t, w in ((0.5, 9.0), (1.5, waiting), (2.5, waiting))]
        return Point(PointKey("vqa", "zipf1", policy, 4.0), records, samples, {"modes": modes, "warmup_s": 1.0})

    modes = {"seconds": {"unmerged": 3.0, "merged": 1.0, "mixture": 0.0}, "switches": 2, "switch_seconds": 0.05,
             "pause_seconds": {"graph_capture": 1.4, "gc": 0.01, "kernel_compile": 0.0}}
    points = [point("valora", 0.2, 0.8, 1.0, modes), point("slora", 0.1, 1.0, 3.0, None)]
    rows = summary_rows(points, SLO())
    (c,) = comparisons(rows, SLO())
    assert c["ratio"] == pytest.approx(0.8) and c["baseline_unsaturated"]
    text = explain(c, rows, points)
    assert "time to first token 0.2 vs 0.1 s, decoding 0.6 vs 0.9 s" in text
    assert "requests waiting 1 vs 3 on average" in text  # the warm-up's sample (9 waiting) left out
    assert "unmerged 75%, merged 25% of its busy time, 2 switches (0.05 s)" in text
    assert "its step loop stalled for graph capture 1.4 s. Against" in text  # what every stream waited through
    assert "first token +0.1 s, decoding -0.3 s; 0.2 s short of 0.6x" in text
