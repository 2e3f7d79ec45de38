"""Tuned tile tables, one JSON file per GPU name, and the lookup that `atmm` calls for every launch.

A table maps measured shapes to the fastest config found by `valora tune-kernels`. Lookup takes the nearest
tuned shape (distance in log2 of each dimension); with no table for the GPU, `heuristic` is used and that is
logged once. Choices are cached per shape, so a step pays one dict lookup per launch.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from valora.lora.ops.configs import OPS, Shape, TileConfig, heuristic

logger = logging.getLogger(__name__)

TABLE_DIR = Path(__file__).parent


def table_path(device_name: str, directory: Path = TABLE_DIR) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


@dataclass
class ConfigTable:
    device: str
    entries: dict[str, list[tuple[Shape, TileConfig]]]
    info: dict[str, Any] = field(default_factory=dict)  # versions, dtype, date: provenance only

    def lookup(self, op: str, shape: Shape) -> TileConfig | None:
        """Config of the nearest tuned shape (sum of |log2| differences over tokens, segments, k, n)."""
        if not self.entries.get(op):
            return None
        def distance(tuned: Shape) -> float:
            return sum(abs(math.log2(max(a, 1)) - math.log2(max(b, 1)))
                       for a, b in zip((shape.tokens, shape.segments, shape.k, shape.n),
                                       (tuned.tokens, tuned.segments, tuned.k, tuned.n)))
        return min(self.entries[op], key=lambda e: distance(e[0]))[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "info": self.info,
            **{op: [{"shape": vars(s), "config": c.to_dict()} for s, c in self.entries.get(op, [])] for op in OPS},
        }

    @staticmethod
    def from_json(d: dict[str, Any]) -> ConfigTable:
        entries = {op: [(Shape(**e["shape"]), TileConfig.from_dict(e["config"])) for e in d.get(op, [])] for op in OPS}
        return ConfigTable(d["device"], entries, d.get("info", {}))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @staticmethod
    def load(path: Path) -> ConfigTable:
        return ConfigTable.from_json(json.loads(path.read_text()))


_UNSET = object()
_override: Any = _UNSET


@functools.cache
def _device_table(device_name: str) -> ConfigTable | None:
    if device_name == "cpu":  # the Triton interpreter: correctness only, nothing to tune
        return None
    path = table_path(device_name)
    if not path.exists():
        logger.warning("no tuned LoRA kernel table for %s (%s); using heuristic tiles. Run `valora tune-kernels`.",
                       device_name, path.name)
        return None
    return ConfigTable.load(path)


@functools.cache
def _device_key(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda":
        return "cpu", 132
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


@functools.lru_cache(maxsize=8192)
def _choose(op: str, shape: Shape, device_name: str, num_sms: int) -> TileConfig:
    table = _device_table(device_name) if _override is _UNSET else _override
    tuned = table.lookup(op, shape) if table is not None else None
    return tuned if tuned is not None else heuristic(op, shape, num_sms)


def choose(op: str, shape: Shape, device: torch.device) -> TileConfig:
    """The tile config `atmm` launches `op` with for `shape` on `device`."""
    return _choose(op, shape, *_device_key(device))


@contextmanager
def use_table(table: ConfigTable | None) -> Iterator[None]:
    """Within the block, look configs up in `table` (None: the heuristic) instead of the device's own table."""
    global _override
    saved, _override = _override, table
    _choose.cache_clear()
    try:
        yield
    finally:
        _override = saved
        _choose.cache_clear()
