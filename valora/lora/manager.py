"""Adapter memory tiers: `max_loras` GPU slots as an LRU over a host cache of `max_cpu_loras` loaded adapters.

- Registering an adapter loads and validates it on the caller's thread, so a bad one is refused before any request
  depends on it; the step loop never reads from disk. An adapter evicted from host memory is reloaded by a loader
  thread while requests that need it wait (and only they: `ready` says whether a step may use it).
- On the GPU, host-to-device copies run on a side stream (host memory is pinned): a slot needed by the coming step
  is filled behind the previous step's work, and `prefetch` fills free slots for waiting requests while a step runs.
- A slot is only reused for an adapter no scheduled request needs; the scheduler guarantees a step never needs
  more than `max_loras` adapters. Pinned adapters are never evicted from either tier.
- Every registration gets a version never given before (`AdapterInfo.key`): what is cached from an adapter's
  computations (KV blocks, image embeddings) is keyed by it, so an adapter unloaded and loaded again under the
  same name never meets the old one's cached results.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch
from torch import nn

from valora.config import LoRAConfig
from valora.distributed.state import Followers
from valora.lora.adapter import AdapterError, LoRAAdapter, load_adapter
from valora.lora.ops import default_backend
from valora.lora.request import LoRARequest
from valora.models.layers.linear import LoRALinear
from valora.models.loader import WeightMapper

logger = logging.getLogger(__name__)


@dataclass
class LoRAStats:
    disk_loads: int = 0  # every read of an adapter directory
    background_loads: int = 0  # of which by the loader thread
    blocking_loads: int = 0  # of which on the thread that asked for a slot: a stall if that is the step loop
    host_hits: int = 0
    host_evictions: int = 0
    slot_loads: int = 0
    slot_load_bytes: int = 0
    slot_hits: int = 0
    slot_evictions: int = 0
    prefetches: int = 0


@dataclass(frozen=True)
class AdapterInfo:
    """What the scheduler needs to know about a registered adapter even while it is not in memory."""

    nbytes: int
    targets: frozenset[str]  # layer paths
    key: str  # "name#version": this registration, unlike any other under the same name

    @property
    def changes_images(self) -> bool:
        """Whether it adapts the vision tower or projector, so its image embeddings differ from the base's."""
        return any(not p.startswith("model.language_model.") for p in self.targets)


class LoRAManager:
    def __init__(self, model: nn.Module, mapper: WeightMapper, config: LoRAConfig, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model, self.mapper, self.config = model, mapper, config
        self.dtype, self.device = dtype, device
        self.backend = default_backend(device) if config.backend == "auto" else config.backend
        self.scalings = torch.zeros(config.max_loras, dtype=torch.float32, device=device)
        self.neg_scalings = torch.zeros_like(self.scalings)
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
        for layer in self.layers.values():
            layer.enable_lora(config.max_loras, config.max_lora_rank, self.scalings, self.neg_scalings, self.backend)
        self.requests: dict[str, LoRARequest] = {}
        self.info: dict[str, AdapterInfo] = {}
        self.pinned: set[str] = set()
        self.failed: dict[str, str] = {}  # adapters whose background reload failed, with the reason
        self._versions = itertools.count(1)
        self.host: OrderedDict[str, LoRAAdapter] = OrderedDict()
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-loader")
        self._pending: dict[str, Future] = {}
        self._reserved: set[str] = set()  # found ready this step: not to be evicted from host before activate
        self.slots: list[str | None] = [None] * config.max_loras
        self.slot_lru: OrderedDict[str, int] = OrderedDict()
        self.slot_version = [0] * config.max_loras  # bumped whenever a slot's contents change
        self.slot_ranks: list[dict[str, list[int]]] = [{} for _ in range(config.max_loras)]  # layer -> slice ranks
        self.slot_scale = [0.0] * config.max_loras  # host copy of `scalings`
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._inflight: list[tuple[torch.cuda.Event, LoRAAdapter]] = []  # keep pinned sources alive until copied
        self._copied: dict[int, torch.cuda.Event] = {}  # prefetched slots: a step that uses one waits for its copy
        self._last_step_slots: set[int] = set()
        self.stats = LoRAStats()
        self.replicas: Followers | None = None  # tensor parallelism: the other ranks, told of every slot change

    # -- registry ---------------------------------------------------------------------------------------
    def register(self, req: LoRARequest) -> None:
        """Load and validate (on the caller's thread); a no-op for an adapter already registered."""
        with self._lock:
            known = self.requests.get(req.lora_name)
            if known is not None:
                if known.lora_path != req.lora_path:
                    raise AdapterError(
                        f"adapter {req.lora_name!r} is already loaded from {known.lora_path}; unload it before "
                        f"loading {req.lora_path} under the same name"
                    )
                return
        adapter = self._read(req)
        if self.replicas is not None:
            self.replicas.call("register", req)
        with self._lock:
            self.requests[req.lora_name] = req
            self.info[req.lora_name] = AdapterInfo(adapter.nbytes, frozenset(p for p, _ in adapter.weights),
                                                   f"{req.lora_name}#{next(self._versions)}")
            self._insert_host(adapter)
        logger.info("adapter %s loaded from %s: rank %d, %d layers, %.1f MiB", req.lora_name, req.lora_path,
                    adapter.rank, len(adapter.targets), adapter.nbytes / 2**20)

    def unregister(self, name: str) -> None:
        with self._lock:
            if name not in self.requests:
                raise AdapterError(f"adapter {name!r} is not loaded")
            if self.replicas is not None:
                self.replicas.call("unregister", name)
            del self.requests[name]
            self.info.pop(name, None)
            self.pinned.discard(name)
            self.failed.pop(name, None)
            self.host.pop(name, None)
            slot = self.slot_lru.pop(name, None)
        if slot is not None:
            self.clear_slot(slot)
        logger.info("adapter %s unloaded", name)

    def pin(self, name: str, pinned: bool = True) -> None:
        with self._lock:
            if name not in self.requests:
                raise AdapterError(f"adapter {name!r} is not loaded")
            if pinned and len(self.pinned | {name}) >= self.config.max_loras:
                raise AdapterError(f"cannot pin {name!r}: at least one of {self.config.max_loras} slots must stay free")
            (self.pinned.add if pinned else self.pinned.discard)(name)

    @property
    def names(self) -> list[str]:
        return list(self.requests)

    # -- host tier --------------------------------------------------------------------------------------
    def _read(self, req: LoRARequest) -> LoRAAdapter:
        adapter = load_adapter(req.lora_name, req.lora_path, self.model, self.mapper, self.config.max_lora_rank,
                               self.dtype)
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        with self._lock:
            self.stats.disk_loads += 1
        return adapter

    def _insert_host(self, adapter: LoRAAdapter) -> None:
        self.host[adapter.name] = adapter
        self.host.move_to_end(adapter.name)
        keep = self.pinned | self._reserved | {adapter.name}
        for name in [n for n in self.host if n not in keep]:
            if len(self.host) <= self.config.max_cpu_loras:
                break
            del self.host[name]
            self.stats.host_evictions += 1

    def _reload(self, req: LoRARequest) -> None:
        try:
            adapter = self._read(req)
        except Exception as e:  # the directory changed since registration: requests for it must fail, not hang
            with self._lock:
                self.failed[req.lora_name] = str(e)
                self._pending.pop(req.lora_name, None)
            logger.error("reloading adapter %s failed: %s", req.lora_name, e)
            return
        with self._lock:
            if self.requests.get(req.lora_name) == req:
                self._insert_host(adapter)
                self.stats.background_loads += 1
            self._pending.pop(req.lora_name, None)

    def wait_for_loads(self, timeout_s: float) -> None:
        """Block until one background reload finishes (or `timeout_s`): for a loop with nothing else to run."""
        with self._lock:
            pending = list(self._pending.values())
        if pending:
            wait(pending, timeout=timeout_s, return_when=FIRST_COMPLETED)

    def begin_step(self) -> None:
        with self._lock:
            self._reserved.clear()

    def ready(self, name: str, load: bool = True) -> bool:
        """Whether `name` can be used this step (in a slot or in host memory; it then stays there until the next
        `begin_step`). If not, and `load`, its reload is started in the background; the caller should let other
        requests go first."""
        with self._lock:
            if name in self.slot_lru or name in self.host:
                self._reserved.add(name)
                return True
            if load and name in self.requests and name not in self._pending and name not in self.failed:
                self._pending[name] = self._loader.submit(self._reload, self.requests[name])
            return False

    def adapter(self, name: str) -> LoRAAdapter:
        """The host copy (loading it on this thread if it was evicted: not for the step loop)."""
        with self._lock:
            if name in self.host:
                self.host.move_to_end(name)
                self.stats.host_hits += 1
                return self.host[name]
            req = self.requests[name]
        adapter = self._read(req)
        with self._lock:
            self._insert_host(adapter)
        return adapter

    # -- GPU tier ---------------------------------------------------------------------------------------
    def activate(self, names: Iterable[str]) -> dict[str, int]:
        """Make every adapter in `names` (each `ready`) resident and return its slot; evicts only adapters not
        in `names` and not pinned."""
        needed = list(dict.fromkeys(names))
        if len(needed) > self.config.max_loras:
            raise RuntimeError(f"a step needs {len(needed)} adapters but only {self.config.max_loras} slots exist")
        for name in needed:
            if name in self.slot_lru:
                self.slot_lru.move_to_end(name)
                self.stats.slot_hits += 1
        missing = [n for n in needed if n not in self.slot_lru]
        if missing:
            self._fill([(n, self._claim_slot(n, set(needed))) for n in missing], after_running=True)
        slots = {name: self.slot_lru[name] for name in needed}
        for slot in slots.values():
            if slot in self._copied:
                torch.cuda.current_stream(self.device).wait_event(self._copied.pop(slot))
        self._last_step_slots = set(slots.values())
        return slots

    def prefetch(self, names: Iterable[str]) -> None:
        """Copy host-resident adapters into free slots the last step did not use; the copies overlap whatever
        runs next, and only a step that uses one of those slots waits for it."""
        todo = []
        for name in dict.fromkeys(names):
            with self._lock:
                if name in self.slot_lru or name not in self.host:
                    continue
                self._reserved.add(name)
            free = [i for i, owner in enumerate(self.slots) if owner is None and i not in self._last_step_slots]
            if not free:
                break
            todo.append((name, free[0]))
            self.slots[free[0]] = name  # claimed now, so the next name picks another slot
        if todo:
            self._fill(todo, after_running=False)
            self.stats.prefetches += len(todo)

    def _claim_slot(self, claimant: str, keep: set[str]) -> int:
        """A free slot, or the least recently used one whose adapter is neither in `keep` nor pinned."""
        slot = next((i for i, owner in enumerate(self.slots) if owner is None), None)
        if slot is None:
            victim = next((n for n in self.slot_lru if n not in keep and n not in self.pinned), None)
            if victim is None:
                raise RuntimeError("no adapter slot can be freed")
            slot = self.slot_lru.pop(victim)
            self.stats.slot_evictions += 1
        self.slots[slot] = claimant
        return slot

    def _fill(self, assignments: list[tuple[str, int]], after_running: bool) -> None:
        """Copy adapters into slots. On the GPU this runs on the side stream. For a slot the coming step needs
        (`after_running`), the copy waits for the work already queued (which may still read the slot's old
        contents) and the compute stream waits for the copy; a prefetched slot is waited for only when used."""
        with self._lock:
            missing = [name for name, _ in assignments if name not in self.host]
            self.stats.blocking_loads += len(missing)
        adapters = [(self.adapter(name), slot) for name, slot in assignments]
        if self._copy_stream is None:
            for adapter, slot in adapters:
                self.write_slot(adapter, slot)
            return
        compute = torch.cuda.current_stream(self.device)
        if after_running:
            self._copy_stream.wait_stream(compute)
        with torch.cuda.stream(self._copy_stream):
            for adapter, slot in adapters:
                self.write_slot(adapter, slot)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        if after_running:
            compute.wait_event(done)
        else:
            self._copied.update({slot: done for _, slot in adapters})
        self._inflight = [(e, a) for e, a in self._inflight if not e.query()]
        self._inflight += [(done, a) for a, _ in adapters]

    def write_slot(self, adapter: LoRAAdapter, slot: int) -> None:
        """Copy `adapter` into `slot` of every layer (the other tensor-parallel ranks copy their shares)."""
        if self.replicas is not None:
            self.replicas.call("write_slot", adapter.name, slot)
        previous = self.slots[slot]
        if previous is not None and previous != adapter.name and self.slot_lru.get(previous) == slot:
            del self.slot_lru[previous]  # a rank that follows the engine's writes learns of evictions here
        ranks: dict[str, list[int]] = {}
        for path, layer in self.layers.items():
            for shard in range(layer.num_slices):
                a, b = adapter.weights.get((path, shard if layer.num_slices > 1 else None), (None, None))
                layer.set_slot(slot, shard, a, b)
                if a is not None:
                    ranks.setdefault(path, [0] * layer.num_slices)[shard] = a.shape[0]
        self.scalings[slot] = adapter.scaling
        self.neg_scalings[slot] = -adapter.scaling
        self.slot_scale[slot] = adapter.scaling
        self.slot_ranks[slot] = ranks
        self.slots[slot] = adapter.name
        self.slot_lru[adapter.name] = slot
        self.slot_version[slot] += 1
        self.stats.slot_loads += 1
        self.stats.slot_load_bytes += adapter.nbytes

    def clear_slot(self, slot: int) -> None:
        if self.replicas is not None:
            self.replicas.call("clear_slot", slot)
        for layer in self.layers.values():
            for shard in range(layer.num_slices):
                layer.set_slot(slot, shard, None, None)
        self.slots[slot] = None
        self.slot_ranks[slot] = {}
        self.slot_version[slot] += 1

    def resident(self) -> list[str]:
        return [n for n in self.slots if n is not None]
