"""The simulator's figure (throughput within the SLO and adapter loads against GPUs) and its markdown tables."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"affinity": "tab:red", "least_loaded": "tab:blue", "round_robin": "tab:green"}


def plot(result: dict, out: Path, name: str) -> list[Path]:
    """Three panels against GPUs: the highest rate within the SLO in total and per GPU, adapter loads per second."""
    rows = result["rows"]
    routers = list(dict.fromkeys(r["router"] for r in rows))
    gpus = sorted({r["gpus"] for r in rows})
    fig, (total, per_gpu, loads) = plt.subplots(1, 3, figsize=(14, 3.8))
    one = next((r["max_rate"] for r in rows if r["gpus"] == 1 and r["max_rate"]), None)
    if one:
        total.plot(gpus, [one * g for g in gpus], color="0.6", linestyle=":", label="N x one GPU")
        per_gpu.axhline(one, color="0.6", linestyle=":", label="one GPU")
    for router in routers:
        mine = [r for r in rows if r["router"] == router]
        style = dict(marker="o", color=COLORS.get(router), label=router)
        total.plot(*zip(*[(r["gpus"], r["max_rate"]) for r in mine if r["max_rate"] is not None]), **style)
        per_gpu.plot(*zip(*[(r["gpus"], r["max_rate_per_gpu"]) for r in mine if r["max_rate"] is not None]), **style)
        loads.plot([r["gpus"] for r in mine], [r["at_load_rate"]["slot_loads_per_s"] for r in mine], **style)
    total.set(xscale="log", yscale="log", ylabel="req/s", title="highest rate within the SLO")
    per_gpu.set(xscale="log", ylabel="req/s per GPU", title="highest rate within the SLO, per GPU")
    per_gpu.set_ylim(bottom=0)
    loads.set(xscale="log", yscale="symlog", ylabel="loads into GPU slots per second",
              title=f"adapter loads at {result['study']['load_rate']:g} req/s per GPU")
    loads.set_ylim(bottom=0)
    for ax in (total, per_gpu, loads):
        ax.set_xlabel("GPUs")
        ax.set_xticks(gpus, [str(g) for g in gpus])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return paths


def _f(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(sim: float | None, measured: float | None) -> str:
    if sim is None or not measured:
        return "-"
    return f"{(sim - measured) / measured:+.0%}"


def markdown(result: dict) -> str:
    """The scaling table and the one-GPU check, as in docs/benchmarks.md."""
    rows = result["rows"]
    routers = list(dict.fromkeys(r["router"] for r in rows))
    load_rate = result["study"]["load_rate"]
    lines = ["| GPUs | adapters | " + " | ".join(f"{r}: req/s within SLO (per GPU)" for r in routers) + " | "
             + " | ".join(f"{r}: slot loads/s, resident" for r in routers) + " |",
             "|" + "---:|" * (2 + 2 * len(routers))]
    per_gpu_adapters = result["study"]["workload"]["adapters_per_gpu"]
    for g in sorted({r["gpus"] for r in rows}):
        by = {r["router"]: r for r in rows if r["gpus"] == g}
        rates = [f"{_f(by[r]['max_rate'])} ({_f(by[r]['max_rate_per_gpu'], 2)})" for r in routers]
        loads = [f"{by[r]['at_load_rate']['slot_loads_per_s']:.1f}, {by[r]['at_load_rate']['resident_share']:.0%}"
                 for r in routers]
        lines.append(f"| {g} | {per_gpu_adapters * g} | " + " | ".join(rates) + " | " + " | ".join(loads) + " |")
    lines.append("")
    lines.append(f"Slot loads per second and the share of requests whose adapter their replica already held, at "
                 f"{load_rate:g} req/s per GPU.")
    check = result["check_one_gpu"]
    lines += ["", "| rate (req/s) | measured throughput | simulated | measured goodput | simulated | "
              "measured SLO | simulated | measured mean latency | simulated |", "|" + "---:|" * 9]
    for p in check["points"]:
        m, s = p["measured"], p["simulated"]
        lines.append(
            f"| {p['rate']:g} | {_f(m['throughput_rps'], 2)} | {_f(s['throughput_rps'], 2)} "
            f"({_pct(s['throughput_rps'], m['throughput_rps'])}) | {_f(m['goodput_rps'], 2)} | "
            f"{_f(s['goodput_rps'], 2)} ({_pct(s['goodput_rps'], m['goodput_rps'])}) | {m['slo_attainment']:.0%} | "
            f"{s['slo_attainment']:.0%} | {_f(m['latency_mean_s'], 2)} s | {_f(s['latency_mean_s'], 2)} s |")
    mm = check["measured_max_rate"]
    lines += ["", f"Highest rate within the SLO on one GPU: measured {_f(mm['within'], 0)} req/s (the next swept "
              f"rate, {_f(mm['next_missing'], 0)}, misses it); simulated {_f(check['simulated_max_rate'], 2)} req/s."]
    return "\n".join(lines)
