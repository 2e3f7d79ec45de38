"""The figures of a results directory (PNG and PDF): the paper's fig. 14 panels, latency CDFs, and the timeline of
one run (requests running and waiting, the mode of each step, switches, and the latency of what arrived when)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from valora.bench.results import MODES, Point  # noqa: E402

COLORS = {"valora": "tab:red", "slora": "tab:blue", "punica": "tab:green", "dlora": "tab:orange"}
MODE_COLORS = {"unmerged": "0.8", "merged": "tab:red", "mixture": "tab:purple"}


def _color(policy: str) -> str:
    return COLORS.get(policy, "0.3")


def _save(fig, out: Path, name: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _panels(keys: list[tuple[str, str]], width: float = 4.0, height: float = 3.2):
    """One panel per (workload, skew): workloads in rows, skews in columns."""
    workloads = list(dict.fromkeys(w for w, _ in keys))
    skews = list(dict.fromkeys(s for _, s in keys))
    fig, axes = plt.subplots(len(workloads), len(skews), figsize=(width * len(skews), height * len(workloads)),
                             squeeze=False)
    where = {(w, s): axes[i][j] for i, w in enumerate(workloads) for j, s in enumerate(skews)}
    for (w, s), ax in where.items():
        if (w, s) not in keys:
            ax.set_visible(False)
        ax.set_title(f"{w}, {s}")
    return fig, where


def fig14(rows: list[dict[str, Any]], out: Path, metric: str = "latency_s", label: str = "mean latency (s)",
          scale: float = 1.0) -> list[Path]:
    """Mean of `metric` (times `scale`, e.g. 1e3 for ms) against the request rate, one line per policy, one panel
    per task mix and skew."""
    keys = list(dict.fromkeys((r["workload"], r["skew"]) for r in rows))
    fig, where = _panels(keys)
    for (w, s), ax in where.items():
        for policy in dict.fromkeys(r["policy"] for r in rows):
            pts = sorted((r["rate"], r[metric]["mean"] * scale) for r in rows
                         if (r["workload"], r["skew"], r["policy"]) == (w, s, policy) and r[metric]["mean"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=policy, color=_color(policy))
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_lines():  # a (mix, skew) panel of the grid that no workload ran stays empty
            ax.legend(fontsize=8)
    return _save(fig, out, "fig14_" + metric.removesuffix("_s"))


def cdfs(points: list[Point], out: Path) -> list[Path]:
    """Per task mix and skew: the CDF of end-to-end latency per policy, one panel per rate."""
    paths = []
    for w, s in dict.fromkeys((p.key.workload, p.key.skew) for p in points):
        group = [p for p in points if (p.key.workload, p.key.skew) == (w, s)]
        rates = sorted({p.key.rate for p in group})
        fig, axes = plt.subplots(1, len(rates), figsize=(3.6 * len(rates), 3.0), squeeze=False)
        for ax, rate in zip(axes[0], rates):
            for p in (p for p in group if p.key.rate == rate):
                lat = np.sort([r.latency_s for r in p.records if r.ok and not r.warmup])
                if len(lat):
                    ax.step(lat, np.arange(1, len(lat) + 1) / len(lat), where="post", label=p.key.policy,
                            color=_color(p.key.policy))
            ax.set_title(f"{w}, {s}, {rate:g} req/s", fontsize=9)
            ax.set_xlabel("latency (s)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("fraction of requests")
        axes[0][0].legend(fontsize=8)
        paths += _save(fig, out, f"cdf_{w}_{s}")
    return paths


def timeline(point: Point, out: Path) -> list[Path]:
    """Requests running and waiting, the share of steps in each mode between polls, switches (vertical lines),
    and each request's latency at its arrival time."""
    samples = point.samples
    t = np.array([s.t for s in samples])
    fig, (ax_q, ax_m, ax_l) = plt.subplots(3, 1, figsize=(10, 7), sharex=True,
                                           gridspec_kw={"height_ratios": [2, 1, 2]})
    ax_q.plot(t, [s.running or 0 for s in samples], label="running", color="tab:blue")
    ax_q.plot(t, [s.waiting or 0 for s in samples], label="waiting", color="tab:orange")
    ax_q.set_ylabel("requests")
    ax_q.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if len(samples) > 1 and samples[0].mode_steps:
        steps = np.array([[s.mode_steps.get(m, 0.0) for m in MODES] for s in samples])
        delta = np.diff(steps, axis=0)
        share = delta / np.maximum(delta.sum(axis=1, keepdims=True), 1)
        ax_m.stackplot(t[1:], share.T, labels=MODES, colors=[MODE_COLORS[m] for m in MODES], step="pre")
        switches = np.array([s.switches or 0 for s in samples])
        for ts in t[1:][np.diff(switches) > 0]:
            for ax in (ax_q, ax_l):
                ax.axvline(ts, color="tab:red", alpha=0.25, lw=0.8)
        ax_m.set_title(f"adapter switches: {int(switches[-1] - switches[0])} (red lines)", fontsize=9)
        ax_m.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_m.set_ylabel("share of steps")
    ok = [r for r in point.records if r.ok]
    ax_l.scatter([r.scheduled_s for r in ok], [r.latency_s for r in ok], s=6, c=["0.6" if r.warmup else "tab:red"
                                                                             for r in ok])
    failed = [r.scheduled_s for r in point.records if not r.ok]
    if failed:
        ax_l.scatter(failed, np.zeros(len(failed)), marker="x", color="k", s=12, label="failed")
        ax_l.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax_l.axvline(point.meta.get("warmup_s", 0.0), color="k", ls="--", lw=0.8)
    ax_l.set_ylabel("latency (s) by arrival")
    ax_l.set_xlabel("time (s); dashed: end of warm-up")
    k = point.key
    fig.suptitle(f"{k.policy}: {k.workload}, {k.skew}, {k.rate:g} req/s")
    return _save(fig, out, f"timeline_{k.stem}")
