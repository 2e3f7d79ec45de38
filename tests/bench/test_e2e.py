"""Acceptance 1 and 4 of issue 12: a CI-sized sweep (tiny Qwen2-VL, two policies, two rates) through the real
server as users start it, checked against its own raw records; and `valora bench run --base-url` against a server
started separately, which yields the same kind of report. Issue 19's scenarios at CI size: a working set larger
than the adapter slots (12 adapters over 2 slots against 2 over 2) on a server of its own, and the step logs every
server writes, read by `valora bench costs`.

Every number the summary reports is recomputed here from the JSONL with plain numpy, the client's token counts are
checked against the server's own counters, and the request list against a fresh build of the seeded workload.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from valora.bench.results import MODES, PointKey, read_jsonl
from valora.bench.server import ServerProcess
from valora.bench.sweep import SweepConfig, run_sweep
from valora.cli import main
from valora.orchestrator.step_log import read_step_log

SLO_LATENCY = 1.5
CONFIG = {
    "server": {"schedulers": ["valora", "dlora"], "warmup_s": 1.0,
               "args": ["--device", "cpu", "--max-num-seqs", "4", "--num-kv-blocks", "512"]},
    "workloads": [{"name": "vqa", "rates": [2, 5], "skews": ["hot:0.8"], "duration_s": 3.0, "warmup_s": 1.0,
                   "image_size": [56, 56], "pictures": 8},
                  *({"name": f"slots-a{n}", "mix": "vqa", "server": "slots", "adapters": n, "policies": ["valora"],
                     "rates": [3], "skews": ["uniform"], "duration_s": 2.0, "warmup_s": 0.5, "image_size": [56, 56],
                     "pictures": 4, **({"reference": "slots-a2"} if n == 12 else {})} for n in (2, 12))],
    "slo": {"latency_s": SLO_LATENCY, "attainment": 0.5},
    "drain_timeout_s": 60.0,
    "seed": 3,
}


@pytest.fixture(scope="module")
def bench_model(model_factory) -> Path:
    return model_factory("qwen2_vl", initializer_range=0.05)


@pytest.fixture(scope="module")
def config(bench_model, tmp_path_factory) -> SweepConfig:
    root = tmp_path_factory.mktemp("bench")
    adapters = {"count": 4, "ranks": [8, 2], "dir": str(root / "adapters"), "dtype": "float32"}
    slots = {"adapters": {"count": 12, "ranks": [8, 2], "distinct": 2, "dir": str(root / "slots"), "dtype": "float32"},
             "args": ["--max-loras", "2", "--max-cpu-loras", "12"]}
    return SweepConfig.from_dict({**CONFIG, "model": {"path": str(bench_model), "adapters": adapters},
                                  "servers": {"slots": slots}})


@pytest.fixture(scope="module")
def results(config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "results"
    assert run_sweep(config, out, progress=False, all_rates=True) == 0  # every point, even a saturated one
    assert main(["bench", "report", str(out)]) == 0
    return out


def _stats(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": v.mean(), "p50": np.percentile(v, 50), "p90": np.percentile(v, 90), "p99": np.percentile(v, 99)}


def test_every_request_accounted_for(results, config):
    spec = config.workloads[0]
    names = tuple(f"lora{i:02d}" for i in range(4))
    for policy in ("valora", "dlora"):
        for rate in (2.0, 5.0):
            stem = results / "points" / f"{policy}__vqa__hot0.8__r{rate:g}"
            records = read_jsonl(Path(f"{stem}.requests.jsonl"))
            expected = spec.workload(rate, "hot:0.8", names, config.seed).requests()
            assert [r["index"] for r in records] == list(range(len(expected))) and len(expected) >= 8
            for rec, req in zip(records, expected):  # the seeded workload, rebuilt, is what was sent
                assert (rec["adapter"], rec["task"], rec["warmup"]) == (req.adapter, req.task, req.warmup)
                assert rec["scheduled_s"] == pytest.approx(req.arrival_s)
                assert rec["status"] == "ok", rec
                assert rec["output_tokens"] == rec["expected_output_tokens"] == req.output_tokens  # ignore_eos
                assert rec["sent_s"] <= rec["first_token_s"] <= rec["finished_s"]
                assert 0 < rec["queue_time_s"] <= rec["ttft_s"]  # the server's queue time lies inside the TTFT
            meta = json.loads(Path(f"{stem}.json").read_text())
            # The server counted the same tokens as the client (warm-up included: the whole point).
            assert meta["server_tokens"] == {"prompt": sum(r["prompt_tokens"] for r in records),
                                             "output": sum(r["output_tokens"] for r in records)}
            modes = meta["modes"]
            assert set(modes["steps"]) <= set(MODES) and sum(modes["steps"].values()) > 0
            assert modes["switches"] >= 0 and sum(modes["seconds"].values()) > 0


def test_working_set_over_the_slots(results, config):
    """12 adapters over 2 slots: every request served, the adapters drawn from all 12 (10 of them sharing the
    weight files of the first two), and the report compares the point with 2 adapters over the same 2 slots."""
    adapters = config.model.prepare(config.servers["slots"].adapters, "slots")
    assert list(adapters) == [f"lora{i:02d}" for i in range(12)]
    assert [(p / "adapter_model.safetensors").is_symlink() for p in adapters.values()] == [False] * 2 + [True] * 10
    assert (adapters["lora11"] / "adapter_model.safetensors").resolve() == \
        (adapters["lora01"] / "adapter_model.safetensors").resolve()
    for n in (2, 12):
        records = read_jsonl(results / "points" / f"valora__slots-a{n}__uniform__r3.requests.jsonl")
        assert records and all(r["status"] == "ok" for r in records)
        assert {r["adapter"] for r in records} <= set(list(adapters)[:n])
    assert len({r["adapter"] for r in records}) > 4
    report = (results / "report.md").read_text()
    assert "## Workloads against their reference" in report and "| slots-a12 | slots-a2 | valora | uniform | 3 |" \
        in report
    assert not list((results / "points").glob("dlora__slots*"))  # the scenario runs for the policies it names


def test_every_server_logs_its_steps(results):
    """One step log per server start; the valora policy's carry its predictions, and `valora bench costs` reads
    the results directory."""
    logs = sorted(p.name for p in (results / "logs").glob("*.steps.jsonl.gz"))
    assert logs == ["dlora.0.steps.jsonl.gz", "valora-slots.0.steps.jsonl.gz", "valora.0.steps.jsonl.gz"]
    records = read_step_log(results / "logs" / "valora.0.steps.jsonl.gz")
    assert records and all(r.predicted_s is not None and r.work is not None for r in records)
    assert all(r.predicted_s is None for r in read_step_log(results / "logs" / "dlora.0.steps.jsonl.gz"))
    assert main(["bench", "costs", str(results), "--skip", "10", "--out", str(results / "costs.md")]) == 0
    summary = json.loads((results / "costs.json").read_text())
    assert set(summary["logs"]) == set(logs) and "as_run" in summary["logs"]["valora.0.steps.jsonl.gz"]


def test_summary_matches_raw_records(results):
    summary = json.loads((results / "summary.json").read_text())
    rows = [r for r in summary["points"] if r["workload"] == "vqa"]
    assert {(r["policy"], r["rate"]) for r in rows} == {(p, r) for p in ("valora", "dlora") for r in (2.0, 5.0)}
    for row in rows:
        records = read_jsonl(results / "points" / f"{row['policy']}__vqa__hot0.8__r{row['rate']:g}.requests.jsonl")
        measured = [r for r in records if not r["warmup"]]
        assert (row["requests"], row["measured"], row["ok"]) == (len(records), len(measured), len(measured))
        latency = [r["finished_s"] - r["scheduled_s"] for r in measured]
        ttft = [r["first_token_s"] - r["scheduled_s"] for r in measured]
        tpot = [(r["finished_s"] - r["first_token_s"]) / (r["output_tokens"] - 1) for r in measured
                if r["output_tokens"] > 1]
        per_token = [lat / (r["prompt_tokens"] + r["output_tokens"]) for lat, r in zip(latency, measured)]
        for name, values in (("latency_s", latency), ("ttft_s", ttft), ("tpot_s", tpot), ("per_token_s", per_token)):
            for stat, v in _stats(values).items():
                assert row[name][stat] == pytest.approx(v), (name, stat)
        span = max(r["finished_s"] for r in measured) - min(r["scheduled_s"] for r in measured)
        met = sum(lat <= SLO_LATENCY for lat in latency)
        assert row["duration_s"] == pytest.approx(span)
        assert row["throughput_rps"] == pytest.approx(len(measured) / span)
        assert row["output_tps"] == pytest.approx(sum(r["output_tokens"] for r in measured) / span)
        assert row["slo_attainment"] == pytest.approx(met / len(measured))
        assert row["goodput_rps"] == pytest.approx(met / span)
    for best in (b for b in summary["max_rate_within_slo"] if b["workload"] == "vqa"):
        attained = {r["rate"]: r["slo_attainment"] >= 0.5 for r in rows if r["policy"] == best["policy"]}
        expect = None if not attained[2.0] else (5.0 if attained[5.0] else 2.0)
        assert best["max_rate"] == expect
    csv_lines = (results / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(summary["points"]) and "latency_p99_s" in csv_lines[0]


def test_plots_and_report_written(results):
    names = ["fig14_latency", "fig14_per_token", "cdf_vqa_hot0.8", "timeline_valora__vqa__hot0.8__r5"]
    for name in names:
        for ext, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
            assert (results / "plots" / f"{name}{ext}").read_bytes()[:4] == magic
    report = (results / "report.md").read_text()
    assert "## Highest rate within the SLO" in report and "## valora against the best baseline" in report
    assert "| dlora | 5 |" in report and "plots/timeline_valora__vqa__hot0.8__r5.png" in report


def test_base_url_gives_the_same_report(config, results, tmp_path):
    """A server the harness did not start (a peer server, for all it knows): adapters come from /v1/models."""
    adapters = {p.name: p for p in sorted(config.model.adapter_dir(config.model.adapters).iterdir())}
    out = tmp_path / "peer"
    with ServerProcess(config.model.path, adapters, "slora", ["--device", "cpu"], tmp_path / "server.log", 120) as url:
        code = main(["bench", "run", "--base-url", url, "--out", str(out), "--name", "peer", "--mix", "video",
                     "--rate", "3", "--duration", "2", "--warmup", "0", "--image-size", "56x56", "--no-progress",
                     "--slo-latency", "5"])
    assert code == 0
    rows = json.loads((out / "summary.json").read_text())["points"]
    assert [(r["policy"], r["workload"], r["rate"]) for r in rows] == [("peer", "video", 3.0)]
    records = read_jsonl(out / "points" / "peer__video__zipf1__r3.requests.jsonl")
    assert records and all(r["status"] == "ok" for r in records)
    assert {r["adapter"] for r in records} <= set(adapters) and {r["task"] for r in records} <= {"detect", "action"}
    assert all(r["images"] == (6 if r["task"] == "action" else 1) for r in records)
    assert rows[0]["ok"] == len(records)
    assert (out / "plots" / "fig14_latency.png").exists() and "| peer | 3 |" in (out / "report.md").read_text()


def test_budget_reserves_a_server_start(config, tmp_path):
    """A budget with room for a point but not for the server's start before it starts no server: exit 75, no log."""
    spec = config.workloads[0]
    out = tmp_path / "results"
    assert run_sweep(config, out, progress=False, budget_s=spec.warmup_s + spec.duration_s + 31) == 75
    assert not (out / "logs").exists() and not (out / "points").exists()


def test_rates_above_a_missed_slo_are_skipped(config, tmp_path):
    """A policy that missed the SLO at 2 req/s is not run at 5 (nothing left: exit 0, no server started);
    `all_rates` runs it anyway (here stopped by the budget before its server starts)."""
    out = tmp_path / "results"
    (out / "points").mkdir(parents=True)
    rows = []
    for policy in ("valora", "dlora"):
        key = PointKey("vqa", "hot0.8", policy, 2.0)
        (out / "points" / f"{key.stem}.json").write_text("{}")
        rows.append({**asdict(key), "slo_attainment": 0.25})
    (out / "summary.json").write_text(json.dumps({"points": rows}))
    assert run_sweep(config, out, workloads=("vqa",), progress=False) == 0
    assert not (out / "logs").exists()
    assert run_sweep(config, out, workloads=("vqa",), progress=False, all_rates=True, budget_s=1.0) == 75
