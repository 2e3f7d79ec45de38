"""What `valora bench run` and `sweep` print when they end: one row per point (requests ok and failed, throughput,
TTFT / TPOT / latency percentiles), then why requests failed, so a run that lost requests cannot look clean."""

from __future__ import annotations

import json
from collections import Counter

from valora.bench.client import Record
from valora.bench.results import Point
from valora.bench.summary import SLO, summarize


def reason(rec: Record) -> str:
    """A short, groupable reason for a failed request: the HTTP status and the server's error code, or the
    client-side exception's type."""
    if rec.status == "timeout":
        return "timeout (still running at the time limit)"
    text = rec.error or ""
    try:
        err = json.loads(text).get("error", {})
    except (ValueError, AttributeError):
        err = None
    if isinstance(err, dict) and (err.get("code") or err.get("message")):
        detail = err.get("code") or str(err.get("message"))[:60]
        return f"HTTP {rec.http_status} {detail}" if rec.http_status else str(detail)
    if rec.http_status and rec.http_status != 200:
        return f"HTTP {rec.http_status}"
    return text.split(":", 1)[0][:60] or "error"


def failures(points: list[Point]) -> tuple[int, int, Counter]:
    """(failed, measured, reasons) over the measured (non-warm-up) requests of `points`; timeouts count as failed."""
    measured = [r for p in points for r in p.records if not r.warmup]
    failed = [r for r in measured if not r.ok]
    return len(failed), len(measured), Counter(reason(r) for r in failed)


def _ms(stats: dict, key: str) -> str:
    v = stats.get(key)
    return "-" if v is None else f"{v * 1e3:.0f}"


def render(points: list[Point], slo: SLO) -> str:
    header = ["point", "ok/sent", "failed", "req/s", "out tok/s", "TTFT p50/p99 ms", "TPOT p50/p99 ms",
              "latency p50/p99 ms"]
    rows = []
    for p in points:
        s = summarize(p.records, slo)
        rows.append([
            p.key.stem, f"{s['ok']}/{s['measured']}", str(s["measured"] - s["ok"]),
            "-" if s["throughput_rps"] is None else f"{s['throughput_rps']:.2f}",
            "-" if s["output_tps"] is None else f"{s['output_tps']:.1f}",
            *(f"{_ms(s[m], 'p50')}/{_ms(s[m], 'p99')}" for m in ("ttft_s", "tpot_s", "latency_s")),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    lines = [fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)]
    failed, measured, reasons = failures(points)
    if failed:
        lines.append(f"{failed} of {measured} requests failed ({failed / measured:.1%}):")
        lines += [f"  {n:6d}  {why}" for why, n in reasons.most_common()]
    else:
        lines.append(f"all {measured} measured requests succeeded")
    return "\n".join(lines)
