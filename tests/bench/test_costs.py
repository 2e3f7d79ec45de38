"""`valora bench costs` (issue 19): predicted against measured step time from a step log, the replay, and the table
it fits; a log cut off mid-write (a killed server) still reads."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from valora.bench.costs import STALL_S, analyse, find_logs
from valora.cli import main
from valora.orchestrator.cost_model import FEATURES, CostTable, DeviceRates, StepCostModel, StepWork
from valora.orchestrator.modes import step_mode
from valora.orchestrator.policy import StepRecord
from valora.orchestrator.step_log import StepLog, read_step_log

SIZES = {f"a{i}": (160, 40)[i % 2] << 20 for i in range(8)}
THETA = np.array([8e-3, 2e-5, 3e-5, 1.5e-3, 2e-4, 1.6e-3, 5e-5, 1.2e-3, 2.5e-6, 0.04])


def write_log(path, steps: int, seed: int = 0) -> list[StepRecord]:
    """A run as the engine logs it: each step priced by an online model before it learns from it."""
    rng = np.random.default_rng(seed)
    model = StepCostModel(CostTable.analytic(DeviceRates(3e12, 8e14, 1e-3), 15 << 30))
    log = StepLog(path)
    records = []
    for i in range(steps):
        decode = rng.random() < 0.8
        adapters = list(rng.choice(list(SIZES), size=int(rng.integers(1, 5)), replace=False))
        tokens: dict[str | None, int] = {}
        for a in rng.choice(adapters, size=int(rng.integers(1, 33))):
            tokens[a] = tokens.get(a, 0) + (1 if decode else int(rng.integers(16, 300)))
        hot = adapters[0] if rng.random() < 0.3 else None
        sizes = {a: SIZES[a] for a in {*tokens, hot} if a}  # the engine gives the sizes of the adapters involved
        seqs = sum(tokens.values()) if decode else len(tokens)
        attention = seqs * int(rng.integers(100, 1000)) if decode else sum(n * n for n in tokens.values())
        work = StepWork(tokens, seqs, hot, sizes, 0 if decode else 256, 0, attention)
        seconds = float(work.features() @ THETA) * float(np.exp(rng.normal(0, 0.03)))
        path_name = "graph" if decode else "eager"
        record = StepRecord(step_mode(hot, tokens).value, hot, work.seqs, sum(tokens.values()), seconds + 0.001,
                            0.001 if i % 50 == 0 else 0.0, 0, work, decode, decode, 0.0, time=float(i))
        record.duration_s = seconds + record.switch_s
        record.predicted_s = model.predict(path_name, work)
        record.costs = {None: record.predicted_s}
        model.observe(path_name, work, record.compute_s)
        log.write([record])
        records.append(record)
    return records


def test_records_round_trip_and_a_cut_log_reads(tmp_path):
    path = tmp_path / "logs" / "valora.steps.jsonl.gz"
    records = write_log(path, 300)
    assert read_step_log(path) == records
    data = path.read_bytes()
    cut = tmp_path / "cut.steps.jsonl.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])  # a server killed mid-run: no gzip trailer, a line cut in two
    partial = read_step_log(cut)
    assert 50 < len(partial) < 300 and partial == records[: len(partial)]
    plain = tmp_path / "plain.jsonl"
    log = StepLog(plain)
    log.write(records[:3])
    assert read_step_log(plain) == records[:3]
    assert sum('"adapter_bytes":{"a' in line for line in plain.read_text().splitlines()) <= 3  # sizes once each
    assert find_logs([tmp_path]) == [path, cut]  # a results directory: its logs/ and its own


def test_report_prices_the_run_and_the_fit_recovers_the_device(tmp_path):
    path = tmp_path / "valora.steps.jsonl.gz"
    records = write_log(path, 1500)
    table_path = tmp_path / "Some_GPU.json"
    text, summary = analyse([path], skip=200, fit_out=table_path, device="Some GPU", info={"commit": "abc"})
    kept = records[200:]
    measured = np.array([r.compute_s for r in kept])
    predicted = np.array([r.predicted_s for r in kept])
    as_run = summary["logs"][path.name]["as_run"]["all/all"]
    assert as_run["steps"] == 1300 and as_run["measured_s"] == pytest.approx(measured.sum())
    assert as_run["median_error"] == pytest.approx(np.median(np.abs(predicted / measured - 1)))
    assert as_run["median_error"] < 0.05 and abs(as_run["total_error"]) < 0.05  # the online model converged
    assert summary["logs"][path.name]["replayed"]["all/all"]["median_error"] < 0.05
    assert set(summary["logs"][path.name]["as_run"]) >= {"graph/unmerged", "graph/mixture", "eager/unmerged"}
    assert "| all | all | as run | 1300 |" in text and "within 15%" in text
    table = CostTable.load(table_path)
    assert table.device == "Some GPU" and table.info == {"commit": "abc"} and set(table.paths) == {"graph", "eager"}
    fitted = StepCostModel(table)
    for r in kept[:100]:
        assert fitted.predict(r.path, r.work) == pytest.approx(float(r.work.features() @ THETA), rel=0.05)
    coefficients = json.loads(table_path.read_text())["paths"]["graph"]["coefficients"]
    assert list(coefficients) == [f for f, _ in FEATURES]
    assert coefficients["lora_passes"] == pytest.approx(THETA[5], rel=0.15)


def test_stalls_are_counted_by_cause_with_their_time(tmp_path):
    """A capture, a merge, a Triton compile, a garbage collection, an allocator retry, the core loop busy outside
    the engine and two steps that are none of these among ordinary steps: each under its cause, with its time from
    the log's first step (the fields survive the log); the ordinary steps are no stall."""
    records = write_log(tmp_path / "ordinary.steps.jsonl.gz", 300)
    assert max(r.duration_s for r in records) < STALL_S
    for i, (capture, switch, gc_s, retries, other) in {
            40: (2.0, 0.0, 0.0, 0, 0.1), 120: (0.0, 0.7, 0.0, 0, 0.05), 150: (0.0, 0.0, 0.9, 0, 0.1),
            160: (0.0, 0.0, 0.0, 2, 1.2), 200: (0.0, 0.0, 0.0, 0, 3.0), 201: (0.05, 0.0, 0.01, 0, 0.4)}.items():
        r = records[i]
        r.capture_s, r.switch_s, r.gc_s, r.alloc_retries = capture, switch, gc_s, retries
        r.duration_s = capture + switch + gc_s + other
    records[170].outside_s = records[170].duration_s = 0.8  # the core loop busy with requests meanwhile
    records[180].compile_s, records[180].duration_s = 1.4, 1.5  # a kernel built at first use
    path = tmp_path / "stalled.steps.jsonl.gz"
    StepLog(path).write(records)
    text, summary = analyse([path], skip=200)
    stalls = summary["logs"][path.name]["stalls"]
    assert stalls["steps"] == 8 and stalls["seconds"] == pytest.approx(2.1 + 0.75 + 1.0 + 1.2 + 0.8 + 1.5 + 3.0 + 0.46)
    assert {c.split(" (")[0]: v["steps"] for c, v in stalls["by_cause"].items()} == \
        {"graph capture": 1, "mode switch": 1, "garbage collection": 1, "CUDA allocator retry": 1, "the core loop": 1,
         "Triton compile": 1, "other": 2}
    assert "| graph capture | 1 | 2.1 | 40.0 | 40.0 |" in text  # write_log's steps are a second apart
    assert "| garbage collection | 1 | 1.0 | 150.0 | 150.0 |" in text
    assert "| 180.0 | 1500 | 0 | 0 | 0 | 0 | 1400 | 0 | 0 |" in text
    assert "| other (none of these: the host) | 2 | 3.5 | 200.0 | 201.0 |" in text
    assert "| 160.0 | 1200 | 0 | 0 | 0 | 0 | 0 | 0 | 2 |" in text
    longest = text[text.index("The longest:"):]
    assert longest.index("| 200.0 | 3000 |") < longest.index("| 40.0 | 2100 |") < longest.index("| 120.0 | 750 |")


def test_cli_reads_a_results_directory(tmp_path, capsys):
    results = tmp_path / "results"
    write_log(results / "logs" / "valora.steps.jsonl.gz", 400)
    (results / "run.json").write_text(json.dumps({"runs": [{"device": "Some GPU", "commit": "abc",
                                                            "started": "2026-01-01T00:00:00"}]}))
    out = tmp_path / "costs.md"
    assert main(["bench", "costs", str(results), "--skip", "100", "--out", str(out),
                 "--fit", str(tmp_path / "table.json")]) == 0
    assert "## valora.steps.jsonl.gz" in out.read_text() and "## valora.steps.jsonl.gz" in capsys.readouterr().out
    assert json.loads(out.with_suffix(".json").read_text())["logs"]["valora.steps.jsonl.gz"]["steps"] == 400
    assert CostTable.load(tmp_path / "table.json").device == "Some GPU"
    with gzip.open(results / "logs" / "valora.steps.jsonl.gz", "rt") as f:  # adapter sizes first, then the step
        assert json.loads(f.readline())["adapter_bytes"] and json.loads(f.readline())["work"]["tokens"]
