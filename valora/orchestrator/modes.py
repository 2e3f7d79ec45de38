"""Inference modes and the switch between them.

- unmerged: base weights W, and every token computes its own adapter's LoRA (any mix in one batch);
- merged: one hot adapter is folded into shadow weights W' = W + s·B·A and every token is the hot adapter's,
  so no LoRA work is done at all;
- mixture: merged weights, and tokens of other adapters (or of none) add their own LoRA and subtract the hot one.

The checkpoint's W is never written: switching rewrites the shadow weights (one pass reading W and writing W'),
unmerging only points the layers back at W, and re-merging the adapter the shadow weights already hold is free.
After any number of switches W is bit-identical to the checkpoint.

On CUDA the second merge of an adapter in a slot captures the pass (one launch per layer, 112 for Qwen2-VL-7B's
all-linear adapter) in a CUDA graph that later merges of it replay: the launches are issued from Python one by
one, about 0.5 ms of a 10 ms switch on the H100 (the kernels are built and timed by the first, eager merge).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Iterable

import torch

from valora.lora.manager import LoRAManager

logger = logging.getLogger(__name__)


class Mode(str, enum.Enum):
    UNMERGED = "unmerged"
    MERGED = "merged"
    MIXTURE = "mixture"


def step_mode(hot: str | None, adapters: Iterable[str | None]) -> Mode:
    if hot is None:
        return Mode.UNMERGED
    return Mode.MERGED if all(a == hot for a in adapters) else Mode.MIXTURE


class ModeSwitcher:
    def __init__(self, manager: LoRAManager, graphs: bool = True) -> None:
        """`graphs`: capture repeated merges in CUDA graphs (on CUDA; off under `--enforce-eager`)."""
        self.manager = manager
        self.graphs = graphs and manager.device.type == "cuda"
        self._merged_once: set[tuple[int, int]] = set()  # (slot, version) merged eagerly, to capture next time
        self._graphs: dict[int, tuple[int, torch.cuda.CUDAGraph]] = {}  # slot -> (version, its merge captured)
        self.hot: str | None = None
        self.hot_slot: int | None = None
        self._held: tuple[str, int, int] | None = None  # (adapter, slot, slot version) the shadow weights hold
        self.num_switches = 0
        self.switch_seconds = 0.0
        self.rewrote = False  # whether the last switch wrote the shadow weights (a merge, not a pointer flip)

    def reserve(self) -> None:
        layers = self.manager.layers.values()
        for layer in layers:
            layer.reserve_merged()
        nbytes = sum(layer.merged_weight.numel() * layer.merged_weight.element_size() for layer in layers)
        logger.info("reserved %.2f GiB of shadow weights for merged and mixture modes (schedulers slora and punica "
                    "never merge and skip this)", nbytes / 2**30)

    @property
    def held(self) -> str | None:
        """The adapter the shadow weights hold while its slot still has it: merging it again is free."""
        if self._held is None:
            return None
        name, slot, version = self._held
        return name if self.manager.slot_version[slot] == version else None

    def switch(self, name: str | None, slot: int | None) -> float:
        """Serve `name` (resident in `slot`) merged, or nothing merged for None; returns the seconds it took."""
        held = None if name is None else (name, slot, self.manager.slot_version[slot])
        self.rewrote = False
        if name == self.hot and slot == self.hot_slot and (name is None or held == self._held):
            return 0.0
        # Only a merge writes weights; unmerging and re-merging what the shadow weights hold flip pointers on the
        # host. Only a merge waits for the device, first for the step in flight (not the switch's time), then for
        # its own kernels: a flip that waited drained the asynchronous pipeline for nothing, and charged the step
        # in flight to the switch (6-7 ms a flip in the H100 sweep, where the policy flipped every step).
        rewrites = held is not None and held != self._held
        sync = rewrites and self.manager.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self.manager.device)
        t0 = time.perf_counter()
        if self.manager.replicas is not None:  # the other tensor-parallel ranks merge their shares
            self.manager.replicas.call("switch", name, slot)
        layers = self.manager.layers
        if name is None:
            for layer in layers.values():
                layer.merged_slot = None
        else:
            assert slot is not None
            graph = self._merge_graph(slot) if rewrites else None
            if graph is not None:  # first: the device merges while the host points the layers at the result
                graph.replay()
            ranks = self.manager.slot_ranks[slot]
            scale = self.manager.slot_scale[slot]
            for path, layer in layers.items():
                if path not in ranks:
                    layer.merged_slot = None
                elif not rewrites or graph is not None:
                    layer.merged_slot = slot if any(ranks[path]) else None
                else:
                    layer.merge(slot, ranks[path], scale)
            self._held = held
        if sync:
            torch.cuda.synchronize(self.manager.device)
        elapsed = time.perf_counter() - t0
        self.rewrote = rewrites
        self.hot, self.hot_slot = name, slot
        self.num_switches += 1
        self.switch_seconds += elapsed
        return elapsed

    def _merge_graph(self, slot: int) -> torch.cuda.CUDAGraph | None:
        """The captured merge of what `slot` holds now; None for an eager merge (no graphs, or the first merge of
        this slot's adapter, which also builds the kernels the capture records)."""
        if not self.graphs:
            return None
        version = self.manager.slot_version[slot]
        held = self._graphs.get(slot)
        if held is not None and held[0] == version:
            return held[1]
        if (slot, version) not in self._merged_once:
            self._merged_once = {k for k in self._merged_once if k[0] != slot} | {(slot, version)}
            return None
        ranks, scale = self.manager.slot_ranks[slot], self.manager.slot_scale[slot]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.manager.device), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for path, layer in self.manager.layers.items():
                if path in ranks:
                    layer.merge(slot, ranks[path], scale)
        self._graphs[slot] = (version, graph)
        return graph
