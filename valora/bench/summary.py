"""Metrics of a point, computed from its raw records only (so a report can always be rebuilt from the JSONL).

Warm-up requests are left out. Failed and timed-out requests count against SLO attainment and goodput but have
no latency. Rates are over the measured window: from the first measured arrival to the last measured finish.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from valora.bench.client import Record

LATENCY_METRICS = ("latency_s", "ttft_s", "tpot_s", "per_token_s", "queue_time_s")


@dataclass(frozen=True)
class SLO:
    """Per-request bounds (unset ones are not checked) and the share of requests that must meet them for a rate
    to count as sustained."""

    latency_s: float | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    per_token_s: float | None = None
    attainment: float = 0.9

    def met(self, rec: Record) -> bool:
        if not rec.ok:
            return False
        for name in ("latency_s", "ttft_s", "tpot_s", "per_token_s"):
            bound, value = getattr(self, name), getattr(rec, name)
            if bound is not None and value is not None and value > bound:
                return False
        return True

    def describe(self) -> str:
        parts = [f"{n[:-2]} <= {getattr(self, n):g} s" for n in ("latency_s", "ttft_s", "tpot_s", "per_token_s")
                 if getattr(self, n) is not None]
        return (" and ".join(parts) or "no bound") + f", for {self.attainment:.0%} of requests"


def stats(values: Iterable[float | None]) -> dict[str, float | None]:
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(v, [50, 90, 99])
    return {"mean": float(v.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(records: list[Record], slo: SLO) -> dict:
    measured = [r for r in records if not r.warmup]
    ok = [r for r in measured if r.ok]
    met = sum(slo.met(r) for r in measured)
    ends = [r.finished_s for r in measured if r.finished_s is not None]
    span = (max(ends) - min(r.scheduled_s for r in measured)) if ends else 0.0

    def rate(x: float) -> float | None:
        return x / span if span > 0 else None

    return {
        "requests": len(records),
        "warmup": len(records) - len(measured),
        "measured": len(measured),
        "ok": len(ok),
        "errors": sum(r.status == "error" for r in measured),
        "timeouts": sum(r.status == "timeout" for r in measured),
        **{name: stats(getattr(r, name) for r in ok) for name in LATENCY_METRICS},
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "output_tokens": sum(r.output_tokens or 0 for r in ok),
        "duration_s": span,
        "throughput_rps": rate(len(ok)),
        "output_tps": rate(sum(r.output_tokens or 0 for r in ok)),
        "total_tps": rate(sum((r.prompt_tokens or 0) + (r.output_tokens or 0) for r in ok)),
        "slo_attainment": met / len(measured) if measured else None,
        "goodput_rps": rate(met),
    }


def meets(attained: float | None, target: float) -> bool:
    """Whether a point's SLO attainment (None: no measured request) meets the target."""
    return attained is not None and attained >= target


def max_rate_within_slo(rates_attainment: list[tuple[float, float | None]], target: float) -> float | None:
    """The highest rate such that it and every lower swept rate meet the attainment target (None if the
    lowest misses): a policy that recovers at a higher rate by luck does not count as sustaining it."""
    best = None
    for rate, attained in sorted(rates_attainment):
        if not meets(attained, target):
            break
        best = rate
    return best
