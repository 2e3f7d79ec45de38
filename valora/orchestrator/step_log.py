"""The engine's step log (`--step-log PATH`): one JSON line per step, `StepRecord.to_json`, so a run's step costs
can be analysed and fitted afterwards (`valora bench costs`).

Gzip-compressed when PATH ends in `.gz` (a 7B model runs about 100 steps a second). Every line is flushed as it
is written (a sync flush keeps the compression dictionary, so this costs little): a server stopped by a signal
never closes the file, and the reader takes every whole line of a stream that was not closed. A new log replaces
an old one at the same path.
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

    def write(self, record: StepRecord) -> None:
        self._file.write(json.dumps(record.to_json(), separators=(",", ":")) + "\n")
        self._file.flush()


def read_step_log(path: str | Path) -> list[StepRecord]:
    path = Path(path)
    records = []
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else path.open() as f:
            for line in f:
                if line.endswith("\n"):  # a last line without its newline was cut off
                    records.append(StepRecord.from_json(json.loads(line)))
    except EOFError:  # a gzip stream cut off: every whole line before the cut counts
        pass
    return records
