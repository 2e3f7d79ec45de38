"""Tuned tables, one JSON file per GPU name, and the lookup that `atmm` makes for every call.

A table maps measured call shapes to the fastest plan found by `valora tune-kernels` (fused kernel, or shrink and
expand with their tiles and split-K chosen together). Lookup takes the nearest tuned shape (distance in log2 of
each dimension) among plans tuned within a factor of two of the call's token count, on the call's own layer
shape where the table has it: a plan tuned for decode (a fused kernel, say) says nothing about a prefill of 8192
tokens, nor a gate/up plan about q/k/v. Past that range, or with no table for the GPU,
`heuristic_plan` is used (the latter is logged once). Choices are cached per shape, so a step pays one dict lookup
per call.

Tables written before plans existed (format 1: one list of tuned shapes per kernel, `shrink` and `expand`) are
still read: their plan for a call is the two kernels' nearest configs, as `atmm` ran them then. A table can hold
both, after part of the call grid was tuned into an older table (the decode shapes, say): plans serve the token
counts they cover, the per-kernel configs the rest.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from valora.lora.ops.configs import OPS, CallShape, Plan, Shape, TileConfig, heuristic, heuristic_plan

logger = logging.getLogger(__name__)

TABLE_DIR = Path(__file__).parent


def table_path(device_name: str, directory: Path = TABLE_DIR) -> Path:
    return directory / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def _log_distance(a: Sequence[int], b: Sequence[int]) -> float:
    return sum(abs(math.log2(max(x, 1)) - math.log2(max(y, 1))) for x, y in zip(a, b))


def call_distance(a: CallShape, b: CallShape) -> float:
    """Sum of |log2| differences over tokens, segments, k, rank and total width, plus one per slice count apart."""
    key = lambda c: (c.tokens, c.segments, c.k, c.rank, c.width)  # noqa: E731
    return _log_distance(key(a), key(b)) + abs(len(a.slices) - len(b.slices))


@dataclass
class ConfigTable:
    device: str
    plans: list[tuple[CallShape, Plan]] = field(default_factory=list)
    kernels: dict[str, list[tuple[Shape, TileConfig]]] = field(default_factory=dict)  # format 1 only
    info: dict[str, Any] = field(default_factory=dict)  # versions, dtype, date, timings: provenance only

    @property
    def element_size(self) -> int:
        """Bytes per activation element of the dtype the table was tuned for (bf16 where it does not say)."""
        return getattr(torch, str(self.info.get("dtype", "bfloat16")).removeprefix("torch.")).itemsize

    def lookup(self, call: CallShape) -> Plan | None:
        """The plan of the nearest tuned call shape whose token count and stack rank cover the call's (None:
        nothing covers it, the caller uses the heuristic)."""
        # The plans of the call's own layer shape, where it has some (another model's layers: all plans), tuned for
        # a stack rank within a factor of two: the rank sets the fused kernel's register tile and the split path's
        # intermediate, so a rank-16 plan says nothing about a rank-64 stack.
        plans = [e for e in self.plans if (e[0].k, e[0].slices) == (call.k, call.slices)] or self.plans
        plans = [e for e in plans if e[0].rank <= 2 * call.rank and call.rank <= 2 * e[0].rank]
        if plans:
            tokens = [s.tokens for s, _ in plans]
            if min(tokens) <= 2 * call.tokens and call.tokens <= 2 * max(tokens):
                return min(plans, key=lambda e: call_distance(call, e[0]))[1]
        if not any(self.kernels.values()):
            return None
        configs = {op: self._kernel(op, call.op_shape(op)) or heuristic(op, call.op_shape(op)) for op in OPS}
        return Plan(**configs)

    def _kernel(self, op: str, shape: Shape) -> TileConfig | None:
        entries = self.kernels.get(op)
        if not entries:
            return None
        key = lambda s: (s.tokens, s.segments, s.k, s.n)  # noqa: E731
        return min(entries, key=lambda e: _log_distance(key(shape), key(e[0])))[1]

    def updated(self, plans: list[tuple[CallShape, Plan]], timings: list[dict[str, Any]]) -> ConfigTable:
        """This table with `plans` (and their `timings` in `info`) in place of its entries for the same shapes; its
        other plans and an earlier format's per-kernel configs are kept."""
        new = {shape for shape, _ in plans}
        shapes = {json.dumps(s.to_dict(), sort_keys=True) for s in new}
        kept = [t for t in self.info.get("timings_us", []) if json.dumps(t.get("shape"), sort_keys=True) not in shapes]
        return ConfigTable(self.device, [e for e in self.plans if e[0] not in new] + plans, self.kernels,
                           dict(self.info, timings_us=kept + timings))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"device": self.device, "info": self.info,
                             "plans": [{"shape": s.to_dict(), "plan": p.to_dict()} for s, p in self.plans]}
        for op in OPS:
            if self.kernels.get(op):
                d[op] = [{"shape": vars(s), "config": c.to_dict()} for s, c in self.kernels[op]]
        return d

    @staticmethod
    def from_json(d: dict[str, Any]) -> ConfigTable:
        plans = [(CallShape.from_dict(e["shape"]), Plan.from_dict(e["plan"])) for e in d.get("plans", [])]
        kernels = {op: [(Shape(**e["shape"]), TileConfig.from_dict(e["config"])) for e in d.get(op, [])] for op in OPS}
        return ConfigTable(d["device"], plans, kernels, d.get("info", {}))

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
def _choose(call: CallShape, device_name: str, num_sms: int, element_size: int) -> Plan:
    if _override is _UNSET:
        table = _device_table(device_name)
        table = table if table is not None and table.element_size == element_size else None
    else:
        table = _override  # what the caller asked for, whatever the dtype
    tuned = table.lookup(call) if table is not None else None
    return tuned if tuned is not None else heuristic_plan(call, num_sms)


_unfit: set[tuple] = set()  # (call, device name, element size) whose table plan this GPU could not launch


def choose(call: CallShape, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> Plan:
    """The plan `atmm` runs `call` by on `device` for activations of `dtype`: the table's where it was tuned for
    elements of that size (a tile that fits shared memory in bf16 may not in fp32), else the heuristic's."""
    name, num_sms = _device_key(device)
    if (call, name, dtype.itemsize) in _unfit:
        return heuristic_plan(call, num_sms)
    return _choose(call, name, num_sms, dtype.itemsize)


def reject(call: CallShape, device: torch.device, dtype: torch.dtype, reason: Exception) -> Plan:
    """The plan for `call` once the one `choose` gave could not be launched (a table plan nearest to an untuned
    shape can ask for more shared memory than the GPU has): the heuristic's, from now on."""
    name, num_sms = _device_key(device)
    if (call, name, dtype.itemsize) not in _unfit:
        _unfit.add((call, name, dtype.itemsize))
        logger.warning("the tuned LoRA plan for %s cannot run on %s (%s); using the heuristic plan for this shape",
                       call, name, reason)
    return heuristic_plan(call, num_sms)


@contextmanager
def use_table(table: ConfigTable | None) -> Iterator[None]:
    """Within the block, look configs up in `table` (None: the heuristic) instead of the device's own table, for
    activations of any dtype."""
    global _override
    saved, _override = _override, table
    _choose.cache_clear()
    try:
        yield
    finally:
        _override = saved
        _choose.cache_clear()
