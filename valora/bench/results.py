"""A results directory: raw records and timelines per point, and the summary derived from them.

    RESULTS_DIR/run.json                         device, date, commit, the sweep config
    RESULTS_DIR/points/<point>.requests.jsonl.gz one record per request (warm-up included, flagged)
    RESULTS_DIR/points/<point>.timeline.jsonl.gz /metrics samples taken during the point
    RESULTS_DIR/points/<point>.json              the point's settings and mode usage; written last, so its
                                                 presence means the point finished (an interrupted one is redone)
    RESULTS_DIR/summary.json, summary.csv        derived by `summarize`, rewritten after every point

The per-request logs are gzipped (a fifth of the bytes: a full sweep's points would otherwise add about 100 MB to
the repository they are committed to); plain `.jsonl` files of earlier runs are still read.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from valora.bench.client import Record
from valora.bench.scrape import Sample
from valora.bench.summary import LATENCY_METRICS, SLO, max_rate_within_slo, summarize

MODES = ("unmerged", "merged", "mixture")


@dataclass(frozen=True, order=True)
class PointKey:
    workload: str
    skew: str
    policy: str
    rate: float

    @property
    def stem(self) -> str:
        return f"{self.policy}__{self.workload}__{self.skew}__r{self.rate:g}"


@dataclass
class Point:
    key: PointKey
    records: list[Record]
    samples: list[Sample]
    meta: dict[str, Any]  # settings of the point, and `modes` (see scrape.mode_usage)


def _write(path: Path, data: str | bytes) -> None:
    """`data` at `path`, whole or not at all (written beside it, then renamed)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    """`rows` as gzipped JSON lines at `path` (.gz added), byte for byte the same for the same rows (no mtime)."""
    text = "".join(json.dumps(r) + "\n" for r in rows).encode()
    _write(path.with_suffix(path.suffix + ".gz"), gzip.compress(text, compresslevel=9, mtime=0))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a point's log `path` (`<point>.requests.jsonl`, say): its gzipped file, or the plain one an
    earlier run wrote."""
    gz = path.with_suffix(path.suffix + ".gz")
    text = gzip.decompress(gz.read_bytes()).decode() if gz.exists() else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def save_point(root: Path, point: Point) -> None:
    d = root / "points"
    d.mkdir(parents=True, exist_ok=True)
    stem = point.key.stem
    _write_jsonl(d / f"{stem}.requests.jsonl", [r.to_json() for r in point.records])
    _write_jsonl(d / f"{stem}.timeline.jsonl", [s.to_json() for s in point.samples])
    _write(d / f"{stem}.json", json.dumps({"key": asdict(point.key), **point.meta}, indent=2))


def is_done(root: Path, key: PointKey) -> bool:
    return (root / "points" / f"{key.stem}.json").exists()


def load_points(root: Path) -> list[Point]:
    points = []
    for meta_path in sorted((root / "points").glob("*.json")):
        meta = json.loads(meta_path.read_text())
        key = PointKey(**meta.pop("key"))
        stem = meta_path.with_suffix("")
        records = [Record.from_json(row) for row in read_jsonl(Path(f"{stem}.requests.jsonl"))]
        samples = [Sample(**row) for row in read_jsonl(Path(f"{stem}.timeline.jsonl"))]
        points.append(Point(key, records, samples, meta))
    return sorted(points, key=lambda p: p.key)


def summary_rows(points: list[Point], slo: SLO) -> list[dict[str, Any]]:
    return [{**asdict(p.key), **summarize(p.records, slo), "modes": p.meta.get("modes")} for p in points]


def max_rates(rows: list[dict[str, Any]], slo: SLO) -> list[dict[str, Any]]:
    """The highest rate within the SLO per (workload, skew, policy)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["skew"], r["policy"]), []).append((r["rate"], r["slo_attainment"]))
    return [{"workload": w, "skew": s, "policy": p, "max_rate": max_rate_within_slo(v, slo.attainment)}
            for (w, s, p), v in sorted(groups.items())]


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in (*LATENCY_METRICS, "modes")}
    for name in LATENCY_METRICS:
        for stat, v in row[name].items():
            out[f"{name[:-2]}_{stat}_s"] = v
    modes = row.get("modes") or {}
    for m in MODES:
        out[f"{m}_seconds"] = (modes.get("seconds") or {}).get(m)
    out["switches"] = modes.get("switches")
    return out


def write_summary(root: Path, points: list[Point], slo: SLO) -> list[dict[str, Any]]:
    rows = summary_rows(points, slo)
    _write(root / "summary.json", json.dumps({"slo": asdict(slo), "points": rows, "max_rate_within_slo":
                                              max_rates(rows, slo)}, indent=2))
    flat = [_flat(r) for r in rows]
    if flat:
        tmp = root / "summary.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
        os.replace(tmp, root / "summary.csv")
    return rows
