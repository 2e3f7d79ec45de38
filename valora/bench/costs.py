"""`valora bench costs LOG...`: how well step times were predicted over a recorded run, and the table that seeds the
`valora` policy's cost model on this device, fitted from it.

A log is what `valora serve --step-log PATH` wrote (a sweep writes one per server start under `logs/`). Three views:

- *as run*: the prediction the engine made for each step before it saw it (the `valora` policy's online model);
- *replayed*: the same steps fed one by one through a fresh model seeded by `--table` (or by nothing), predicting
  each before learning from it: this prices any policy's run, the baselines' included;
- *fitted*: one least-squares fit over every step given, written with `--fit` as the device's recorded table
  (`valora/orchestrator/step_costs/<device>.json`; fit it from the `valora` policy's logs: each baseline runs its
  own LoRA kernel).

Steps before `--skip` (the server's first steps: compilation, allocator growth, graph captures) are left out of
every figure. The target (issue 19) is a prediction within 15% of the measured time.

Each log also gets its *stalls*, every step included: steps of `STALL_S` or more, each of which holds up every
running stream by as much, by cause (`stall_cause`: a graph capture, a mode switch, a Triton kernel compiled at
first use, a garbage collection, an allocator retry or the core loop outside the engine, or none of these: the host),
with when they happened, so a latency tail in a sweep point can be traced to its seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from valora.errors import UserError
from valora.orchestrator.cost_model import CostTable, StepCostModel
from valora.orchestrator.policy import StepRecord
from valora.orchestrator.step_log import read_step_log

TARGET = 0.15
LOG_GLOB = "*.steps*.jsonl*"
STALL_S = 0.25  # a step this long holds every running stream up by that much: tens of decode steps


def find_logs(paths: list[Path]) -> list[Path]:
    """Step logs among `paths`: files as given, and in a directory (a sweep's results) those under `logs/`."""
    found = []
    for p in paths:
        if p.is_dir():
            found += sorted((p / "logs").glob(LOG_GLOB)) + sorted(p.glob(LOG_GLOB))
        else:
            found.append(p)
    missing = [p for p in found if not p.is_file()]
    if missing or not found:
        raise UserError(f"no step log ({LOG_GLOB}) at {', '.join(map(str, missing or paths))}")
    return found


@dataclass
class Accuracy:
    """Predicted against measured step time over a group of steps."""

    steps: int
    measured_s: float
    predicted_s: float
    median_error: float  # of |predicted / measured - 1| per step
    p90_error: float
    within: float  # share of steps within TARGET

    @property
    def total_error(self) -> float:
        return self.predicted_s / self.measured_s - 1 if self.measured_s else float("nan")

    @staticmethod
    def of(predicted: np.ndarray, measured: np.ndarray) -> Accuracy:
        err = np.abs(predicted / np.maximum(measured, 1e-9) - 1)
        return Accuracy(len(measured), float(measured.sum()), float(predicted.sum()), float(np.median(err)),
                        float(np.percentile(err, 90)), float((err <= TARGET).mean()))

    def row(self, label: list[str]) -> list[str]:
        return [*label, str(self.steps), f"{self.measured_s / self.steps * 1e3:.2f}",
                f"{self.predicted_s / self.steps * 1e3:.2f}", f"{self.total_error:+.1%}", f"{self.median_error:.1%}",
                f"{self.p90_error:.1%}", f"{self.within:.0%}"]

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "total_error": self.total_error}


def accuracy_by_group(records: list[StepRecord], predicted: np.ndarray) -> dict[tuple[str, str], Accuracy]:
    """Per (path, mode), and ("all", "all")."""
    measured = np.array([r.compute_s for r in records])
    groups: dict[tuple[str, str], list[int]] = {("all", "all"): list(range(len(records)))}
    for i, r in enumerate(records):
        groups.setdefault((r.path, r.mode), []).append(i)
    return {k: Accuracy.of(predicted[idx], measured[idx]) for k, idx in sorted(groups.items()) if idx}


def replay(records: list[StepRecord], seed: CostTable | None) -> np.ndarray:
    """Each step predicted by a model that has seen the ones before it, then shown it."""
    model = StepCostModel(seed or CostTable("none", {}, 0.0))
    out = np.empty(len(records))
    for i, r in enumerate(records):
        out[i] = model.predict(r.path, r.work)
        model.observe(r.path, r.work, r.compute_s)
    return out


def stall_cause(r: StepRecord) -> str:
    if r.capture_s >= r.duration_s / 2:
        return "graph capture"
    if r.switch_s >= r.duration_s / 2:
        return "mode switch"
    if r.compile_s >= r.duration_s / 2:
        return "Triton compile"
    if r.gc_s >= r.duration_s / 2:
        return "garbage collection"
    if r.alloc_retries:
        return "CUDA allocator retry"
    if r.outside_s >= r.duration_s / 2:
        return "the core loop (requests in, outputs out)"
    return "other (none of these: the host)"


def stalls(records: list[StepRecord], longest: int = 10) -> tuple[list[str], dict[str, Any]]:
    """Markdown lines and numbers: the steps of `STALL_S` or more by cause, and the longest of them, with their time
    from the log's first step."""
    slow = [r for r in records if r.duration_s >= STALL_S]
    lines = [f"Stalls (steps of {STALL_S * 1e3:.0f} ms or more, every step included): {len(slow)}, "
             f"{sum(r.duration_s for r in slow):.1f} s.", ""]
    if not slow:
        return lines, {"steps": 0, "seconds": 0.0}
    t0 = records[0].time
    causes: dict[str, list[StepRecord]] = {}
    for r in slow:
        causes.setdefault(stall_cause(r), []).append(r)
    lines += _table(["cause", "steps", "seconds", "first at s", "last at s"],
                    [[c, str(len(rs)), f"{sum(r.duration_s for r in rs):.1f}", f"{rs[0].time - t0:.1f}",
                      f"{rs[-1].time - t0:.1f}"] for c, rs in causes.items()])
    lines += ["", "The longest:", ""]
    lines += _table(["at s", "ms", "launch ms", "outside ms", "capture ms", "switch ms", "compile ms", "gc ms",
                     "alloc retries", "path", "mode", "seqs", "tokens"],
                    [[f"{r.time - t0:.1f}",
                      *(f"{s * 1e3:.0f}" for s in (r.duration_s, r.launch_s, r.outside_s, r.capture_s, r.switch_s,
                                                    r.compile_s, r.gc_s)),
                      str(r.alloc_retries), r.path, r.mode, str(r.num_seqs), str(r.num_tokens)]
                     for r in sorted(slow, key=lambda r: -r.duration_s)[:longest]])
    return lines + [""], {"steps": len(slow), "seconds": sum(r.duration_s for r in slow),
                          "by_cause": {c: {"steps": len(rs), "seconds": sum(r.duration_s for r in rs)}
                                       for c, rs in causes.items()}}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


HEADER = ["path", "mode", "prediction", "steps", "measured ms/step", "predicted ms/step", "total", "median |err|",
          "p90 |err|", f"within {TARGET:.0%}"]


def analyse(logs: list[Path], skip: int = 200, seed: CostTable | None = None, fit_out: Path | None = None,
            device: str = "unknown", info: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The report (markdown) and its numbers; with `fit_out`, the fitted table is written there."""
    lines = ["# Step costs: predicted against measured", "",
             f"Steps after the first {skip} of each log; time without switches and graph captures. `total`: summed "
             f"prediction over summed measurement. Target: within {TARGET:.0%}.", ""]
    summary: dict[str, Any] = {"skip": skip, "logs": {}}
    everything: list[StepRecord] = []
    for log in logs:
        records = [r for r in read_step_log(log) if r.work is not None]
        kept = records[skip:]
        entry: dict[str, Any] = {"steps": len(records)}
        lines += [f"## {log.name}", "", f"{len(records)} steps, {len(kept)} after the first {skip}.", ""]
        if not kept:
            summary["logs"][log.name] = entry
            continue
        everything += kept
        rows = []
        if all(r.predicted_s is not None for r in kept):
            ran = accuracy_by_group(kept, np.array([r.predicted_s for r in kept]))
            rows += [a.row([*k, "as run"]) for k, a in ran.items()]
            entry["as_run"] = {"/".join(k): a.to_json() for k, a in ran.items()}
        replayed = accuracy_by_group(kept, replay(records, seed)[skip:])
        rows += [a.row([*k, "replayed"]) for k, a in replayed.items()]
        entry["replayed"] = {"/".join(k): a.to_json() for k, a in replayed.items()}
        modes = {m: sum(r.mode == m for r in kept) for m in ("unmerged", "merged", "mixture")}
        lines += _table(HEADER, rows)
        lines += ["", "Steps per mode: " + ", ".join(f"{m} {n}" for m, n in modes.items()) + ".", ""]
        stall_lines, entry["stalls"] = stalls(records)
        lines += stall_lines
        summary["logs"][log.name] = entry
    if everything:
        steps = [(r.path, r.work, r.compute_s) for r in everything]
        model = StepCostModel.fit(steps)
        table = model.table(device, info)
        fitted = accuracy_by_group(everything, np.array([model.predict(p, w) for p, w, _ in steps]))
        summary["fitted"] = {"/".join(k): a.to_json() for k, a in fitted.items()}
        summary["coefficients"] = {p: d["coefficients"] for p, d in table["paths"].items()}
        lines += ["## One fit over every step above", "",
                  "In-sample: how well a linear model of these features can explain the steps at all.", ""]
        lines += _table(HEADER, [a.row([*k, "one fit"]) for k, a in fitted.items()])
        lines += ["", "Coefficients (seconds per unit; `features` in the table says the units):", ""]
        names = list(next(iter(table["paths"].values()))["coefficients"])
        lines += _table(["path", *names], [[p, *(f"{d['coefficients'][n]:.3g}" for n in names)]
                                           for p, d in table["paths"].items()])
        if fit_out is not None:
            fit_out.parent.mkdir(parents=True, exist_ok=True)
            fit_out.write_text(json.dumps(table, indent=1) + "\n")
            lines += ["", f"Table written to `{fit_out}` for device {device!r}."]
    return "\n".join(lines) + "\n", summary


def run_info(dirs: list[Path]) -> tuple[str | None, dict[str, Any]]:
    """(device, provenance) of the last run recorded in these results directories' `run.json`."""
    device, info = None, {}
    for d in (p for p in dirs if (p / "run.json").exists()):
        run = json.loads((d / "run.json").read_text())["runs"][-1]
        device = run["device"]
        info = {"commit": run["commit"], "started": run["started"], "source": str(d)}
    return device, info


def write_costs(results: Path, skip: int = 200) -> Path | None:
    """`costs.md` and `costs.json` of a sweep's results directory from its step logs (None: it has none), as
    `valora bench costs DIR --out DIR/costs.md` writes them."""
    logs = sorted((results / "logs").glob(LOG_GLOB))
    if not logs:
        return None
    device, info = run_info([results])
    text, summary = analyse(logs, skip, device=device or "unknown", info=info)
    out = results / "costs.md"
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    return out
