"""report.md: what was built, how well each task does against its floor, and how to serve it."""

from __future__ import annotations


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _held_out(score: dict) -> str:
    iou = f" (IoU {score['mean_iou']:.2f})" if score.get("mean_iou") is not None else ""
    return f"{score['accuracy']:.1%}{iou}"


def render_markdown(r: dict) -> str:
    tasks = {t["name"]: t for t in r["tasks"]}
    spec = r["adapter_spec"]
    lines = [
        f"# Adapter build: {len(r['adapters'])} adapter(s) for {len(tasks)} task(s) ({r['strategy']})",
        "",
        f"Base model `{r['base']}`; LoRA r={spec['r']}, alpha={spec['lora_alpha']}, LM modules "
        f"{', '.join(spec['lm_modules']) or '-'}, vision modules {', '.join(spec['vision_modules']) or '-'}; "
        f"{spec['train']['steps']} steps of batch {spec['train']['batch_size']} per training, seed "
        f"{spec['train']['seed']}. Trainings run {r['trainings']['run']}, reused from the cache "
        f"{r['trainings']['reused']}; {r['wall_seconds']:.0f} s in all.",
        "",
        "Accuracy is exact-answer accuracy (box tasks: share of boxes with IoU >= 0.5, mean IoU in brackets), "
        "measured through VaLoRA's engine. Floors are checked on the validation split; the held-out split (the "
        "last 20% of every source) decides nothing. The base model is asked every task in text.",
        "",
        "| adapter | task | answer | floor | validation | held-out | base model (held-out) | meets floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in r["adapters"]:
        for t in a["tasks"]:
            val = a["validation"][t]
            ok = "yes" if val >= tasks[t]["floor"] else "**no**"
            answer = f"{tasks[t]['kind']} head" if tasks[t]["answer"] == "head" else "text"
            lines.append(f"| {a['name']} | {t} | {answer} | {tasks[t]['floor']:.0%} | {_pct(val)} | "
                         f"{_held_out(a['held_out'][t])} | {_held_out(r['base_held_out'][t])} | {ok} |")
    lines += ["", "| adapter | tasks | heads | training time |", "|---|---|---|---|"]
    for a in r["adapters"]:
        lines.append(f"| {a['name']} | {', '.join(a['tasks'])} | {', '.join(a['heads']) or '-'} | "
                     f"{a['training_seconds']:.0f} s |")
    lines += ["", "## Fusion log", ""]
    for e in r["fusion_log"]:
        scores = ", ".join(f"{t} {s:.1%}" for t, s in e["scores"].items())
        below = f"; under the floor: {', '.join(e['below'])}" if e["below"] else ""
        lines.append(f"- `{e['task']}` {e['action']} (adapter-{e['adapter'] + 1}): {scores}{below}")
    if r["below_floor"]:
        lines += ["", f"**Shipped under their floor (validation): {', '.join(r['below_floor'])}.**"]
    lines += ["", "## Tasks", "", "| task | data | prompt | train / val / held-out | teacher |",
              "|---|---|---|---|---|"]
    for t in r["tasks"]:
        teacher = "-"
        if t["teacher"]:
            teacher = (f"logistic regression on {t['teacher']['labelled']} labelled images labelled "
                       f"{t['teacher']['relabelled']} ({t['teacher']['agreement']:.1%} right)")
        options = ", ".join(f"{k}={v}" for k, v in t["options"].items())
        sizes = " / ".join(str(t["sizes"][s]) for s in ("train", "val", "test"))
        lines.append(f"| {t['name']} | {t['dataset']}({options}) | {t['prompt']} | {sizes} | {teacher} |")
    modules = " ".join(f"{a['name']}={a['path']}" for a in r["adapters"])
    lines += ["", "## Serving", "", "```", f"valora serve {r['base']} --lora-modules {modules}", "```", ""]
    return "\n".join(lines)
