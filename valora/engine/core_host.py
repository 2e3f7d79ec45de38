"""`CoreHost`: the engine core as a server drives it, wherever it runs (its own process or a thread).

Around `LLMEngine` it adds what serving needs and the offline path does not: admission against the cap on
requests in flight (an API call's requests are added all at once or refused together, with the reason), adapter
loads by name with core-assigned ids (the core is the single source of truth for adapters; every change is an
`AdapterEvent` that front ends mirror), and the step with its outputs.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from valora.engine.errors import check_capacity
from valora.engine.llm_engine import EngineStats, LLMEngine
from valora.engine.request import EngineCoreOutput, EngineCoreRequest
from valora.heads.artifact import HeadNames
from valora.lora.adapter import AdapterError
from valora.lora.request import LoRARequest


@dataclass(frozen=True)
class AdapterEvent:
    """An adapter the core loaded (`lora` set, with its heads' names) or unloaded (`lora` None)."""

    name: str
    lora: LoRARequest | None
    heads: HeadNames | None = None


@dataclass(frozen=True)
class CoreInfo:
    """What a front end learns from the core when it connects."""

    max_model_len: int
    max_in_flight: int | None
    adapters: tuple[AdapterEvent, ...]


class CoreHost:
    def __init__(self, engine: LLMEngine, max_in_flight: int | None = None) -> None:
        """`max_in_flight`: requests (sequences) the core holds at most, running and waiting; None: no cap."""
        self.engine = engine
        self.max_in_flight = max_in_flight
        self._lora_ids = itertools.count(1)

    def info(self) -> CoreInfo:
        return CoreInfo(self.engine.max_model_len, self.max_in_flight, tuple(self.adapters()))

    # -- requests -----------------------------------------------------------------------------------------
    def add(self, reqs: list[EngineCoreRequest]) -> None:
        """Queue all of `reqs` (one API call's) or none: `InputError` when they could never fit the cap,
        `QueueFullError` when they do not fit now, the engine's refusal (an adapter gone, say) otherwise."""
        if self.max_in_flight is not None:
            check_capacity(len(self.engine.requests), len(reqs), self.max_in_flight)
        added: list[str] = []
        try:
            for req in reqs:
                self.engine.add_request(req)
                added.append(req.request_id)
        except Exception:
            self.engine.abort_request(added)
            raise

    def abort(self, request_ids: Iterable[str]) -> None:
        self.engine.abort_request(request_ids)

    def step(self) -> list[EngineCoreOutput]:
        return self.engine.step()

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stalled(self) -> bool:
        """Whether the last step launched nothing while requests wait (for an adapter's reload, say)."""
        return self.engine.stalled

    # -- adapters and stats ---------------------------------------------------------------------------------
    def load_lora(self, name: str, path: str) -> AdapterEvent:
        if name in self.engine.list_loras():
            raise AdapterError(f"the name {name!r} is already in use; unload the adapter first")
        lora = LoRARequest(name, next(self._lora_ids), path)
        self.engine.add_lora(lora)
        return self._event(name)

    def unload_lora(self, name: str) -> tuple[AdapterEvent, bool]:
        """The event, and whether the adapter left memory already (else once its requests finish)."""
        return AdapterEvent(name, None), self.engine.remove_lora(name)

    def pin_lora(self, name: str, pinned: bool = True) -> None:
        self.engine.pin_lora(name, pinned)

    def adapters(self) -> list[AdapterEvent]:
        return [self._event(n) for n in self.engine.list_loras() if n not in self.engine.draining]

    def _event(self, name: str) -> AdapterEvent:
        heads = self.engine.heads.get(name)
        return AdapterEvent(name, self.engine.lora_manager.requests[name], heads.names if heads else None)

    def stats(self) -> EngineStats:
        return self.engine.stats()
