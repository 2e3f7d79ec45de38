"""Which replica a request goes to: the policies a front end (Ray Serve, an llm-d gateway) can apply.

`affinity` is Ray Serve's `serve.multiplexed` routing in its simplest form: a replica that already holds the
request's adapter, the least loaded of them, unless each holder has `max_load` requests outstanding; otherwise
the least-loaded replica, which then loads the adapter. Ties go to the replica after the last one chosen, so an
idle cluster still spreads its requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from valora.bench.sim.replica import Replica


class Router(Protocol):
    name: str

    def choose(self, adapter: str, replicas: Sequence[Replica]) -> Replica: ...


class RoundRobin:
    name = "round_robin"

    def __init__(self) -> None:
        self._next = 0

    def choose(self, adapter: str, replicas: Sequence[Replica]) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastLoaded:
    name = "least_loaded"

    def __init__(self) -> None:
        self._last = -1

    def _least(self, candidates: Sequence[Replica], n: int) -> Replica:
        best = min(candidates, key=lambda r: (r.outstanding, (r.index - self._last - 1) % n))
        self._last = best.index
        return best

    def choose(self, adapter: str, replicas: Sequence[Replica]) -> Replica:
        return self._least(replicas, len(replicas))


class AdapterAffinity(LeastLoaded):
    name = "affinity"

    def __init__(self, max_load: int) -> None:
        super().__init__()
        self.max_load = max_load

    def choose(self, adapter: str, replicas: Sequence[Replica]) -> Replica:
        holders = [r for r in replicas if r.holds(adapter) and r.outstanding < self.max_load]
        return self._least(holders or replicas, len(replicas))


ROUTERS = ("affinity", "least_loaded", "round_robin")


def make_router(name: str, max_load: int) -> Router:
    if name == "affinity":
        return AdapterAffinity(max_load)
    if name == "least_loaded":
        return LeastLoaded()
    if name == "round_robin":
        return RoundRobin()
    raise ValueError(f"router {name!r}: expected one of {ROUTERS}")
