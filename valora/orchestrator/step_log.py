"""The engine's step log (`--step-log PATH`): one JSON line per step, `StepRecord.to_json`, so a run's step costs
can be analysed and fitted afterwards (`valora bench costs`).

Gzip-compressed when PATH ends in `.gz` (a 7B model runs about 100 steps a second). An adapter's size is written
once, on a line of its own (`{"adapter_bytes": {name: bytes}}`) before the first step that uses it, and the
reader puts it back into each step's record. Lines are flushed as they are written (a sync flush keeps the
compression dictionary, so this costs little): a server stopped by a signal never closes the file, and the reader
takes every whole line of a stream that was not closed. A new log replaces an old one at the same path.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from valora.orchestrator.policy import StepRecord


class StepLog:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = gzip.open(path, "wt", compresslevel=1) if path.suffix == ".gz" else path.open("w")  # noqa: SIM115
        self._sizes: dict[str, int] = {}  # adapter sizes written so far

    def write(self, records: list[StepRecord]) -> None:
        lines = []
        for record in records:
            d = record.to_json()
            if d["work"] is not None:
                sizes = d["work"].pop("adapter_bytes")
                new = {a: n for a, n in sizes.items() if self._sizes.get(a) != n}
                if new:
                    self._sizes.update(new)
                    lines.append(json.dumps({"adapter_bytes": new}, separators=(",", ":")))
            lines.append(json.dumps(d, separators=(",", ":")))
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()


def read_step_log(path: str | Path) -> list[StepRecord]:
    path = Path(path)
    records = []
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            sizes: dict[str, int] = {}
            for line in f:
                if not line.endswith("\n"):  # a last line without its newline was cut off
                    break
                d = json.loads(line)
                if "adapter_bytes" in d:
                    sizes.update(d["adapter_bytes"])
                    continue
                if d["work"] is not None:
                    w = d["work"]
                    w["adapter_bytes"] = {a: sizes[a] for a in {*w["tokens"], w["hot"]} if a}
                records.append(StepRecord.from_json(d))
    except EOFError:  # a gzip stream cut off: every whole line before the cut counts
        pass
    return records
