"""Adapter memory: `max_loras` GPU slots as an LRU over a host cache of `max_cpu_loras` loaded adapters.

Adapters are validated when first registered, so a bad one is refused before any request depends on it.
A slot is only reused for an adapter that no scheduled request needs; the scheduler guarantees that a step
never needs more than `max_loras` adapters.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from valora.config import LoRAConfig
from valora.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from valora.lora.ops import default_backend
from valora.lora.request import LoRARequest
from valora.models.layers.linear import LoRALinear
from valora.models.loader import WeightMapper

logger = logging.getLogger(__name__)


@dataclass
class LoRAStats:
    disk_loads: int = 0
    slot_loads: int = 0
    slot_hits: int = 0
    slot_evictions: int = 0
    host_evictions: int = 0


class LoRAManager:
    def __init__(self, model: nn.Module, mapper: WeightMapper, config: LoRAConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.mapper, self.config = model, mapper, config
        self.dtype, self.device = dtype, device
        self.backend = default_backend(device) if config.backend == "auto" else config.backend
        self.scalings = torch.zeros(config.max_loras, dtype=torch.float32, device=device)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        for layer in self.layers.values():
            layer.enable_lora(config.max_loras, config.max_lora_rank, self.scalings, self.backend)
        self.requests: dict[str, LoRARequest] = {}
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self.slots: list[str | None] = [None] * config.max_loras
        self.slot_lru: OrderedDict[str, int] = OrderedDict()
        self.stats = LoRAStats()

    # -- registry and host tier -------------------------------------------------------------------------
    def register(self, req: LoRARequest) -> LoRAAdapter:
        known = self.requests.get(req.lora_name)
        if known is not None and known.lora_path != req.lora_path:
            raise AdapterError(
                f"adapter {req.lora_name!r} is already loaded from {known.lora_path}; unload it before loading "
                f"{req.lora_path} under the same name"
            )
        adapter = self._host_get(req)
        self.requests[req.lora_name] = req
        return adapter

    def _host_get(self, req: LoRARequest) -> LoRAAdapter:
        if req.lora_name in self.host:
            self.host.move_to_end(req.lora_name)
            return self.host[req.lora_name]
        adapter = load_adapter(req.lora_name, req.lora_path, self.model, self.mapper, self.config.max_lora_rank,
                               self.dtype)
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        self.stats.disk_loads += 1
        self.host[req.lora_name] = adapter
        while len(self.host) > self.config.max_cpu_loras:
            evicted, _ = self.host.popitem(last=False)
            self.stats.host_evictions += 1
            logger.debug("evicted adapter %s from host memory", evicted)
        return adapter

    def unregister(self, name: str) -> None:
        if name not in self.requests:
            raise AdapterError(f"adapter {name!r} is not loaded")
        del self.requests[name]
        self.host.pop(name, None)
        slot = self.slot_lru.pop(name, None)
        if slot is not None:
            self._clear_slot(slot)

    @property
    def names(self) -> list[str]:
        return list(self.requests)

    # -- GPU slots --------------------------------------------------------------------------------------
    def activate(self, names: Iterable[str]) -> dict[str, int]:
        """Make every adapter in `names` resident and return its slot; evicts only adapters not in `names`."""
        needed = list(dict.fromkeys(names))
        if len(needed) > self.config.max_loras:
            raise RuntimeError(f"a step needs {len(needed)} adapters but only {self.config.max_loras} slots exist")
        for name in needed:
            if name in self.slot_lru:
                self.slot_lru.move_to_end(name)
                self.stats.slot_hits += 1
        for name in needed:
            if name not in self.slot_lru:
                self._load_slot(name, self._free_slot(set(needed)))
        return {name: self.slot_lru[name] for name in needed}

    def _free_slot(self, keep: set[str]) -> int:
        for i, owner in enumerate(self.slots):
            if owner is None:
                return i
        for name, slot in self.slot_lru.items():
            if name not in keep:
                del self.slot_lru[name]
                self.stats.slot_evictions += 1
                return slot
        raise RuntimeError("no adapter slot can be freed")

    def _load_slot(self, name: str, slot: int) -> None:
        adapter = self._host_get(self.requests[name])
        for path, layer in self.layers.items():
            for shard in range(layer.num_slices):
                key = (path, shard if layer.num_slices > 1 else None)
                a, b = adapter.weights.get(key, (None, None))
                layer.set_slot(slot, shard, a, b)
        self.scalings[slot] = adapter.scaling
        self.slots[slot] = name
        self.slot_lru[name] = slot
        self.stats.slot_loads += 1

    def _clear_slot(self, slot: int) -> None:
        for layer in self.layers.values():
            for shard in range(layer.num_slices):
                layer.set_slot(slot, shard, None, None)
        self.slots[slot] = None

    def resident(self) -> list[str]:
        return [n for n in self.slots if n is not None]
