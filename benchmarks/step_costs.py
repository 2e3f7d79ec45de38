"""Step costs on the GPU (issue 19): the engine run through steps of every mode, each logged with the `valora`
policy's prediction of it made before the step was seen, then `valora bench costs` on that log.

The e2e sweep's model and adapters (Qwen2-VL-7B shapes, random bf16 weights, 448x448 images; 16 adapters of ranks
64/32/16/8 on every LM linear; built on first use, shared with `valora bench sweep benchmarks/e2e_sweep.yaml`).
Waves of requests: batches of 1 to 64 sequences over one adapter, four, sixteen, or one hot adapter with 20% spread
over the others, text-only or with an image each; every wave twice, once unmerged and once with its most common
adapter merged (a merged step when the wave is all that adapter, a mixture otherwise): the policy's own choices
would leave modes it never picks unmeasured, and a table must price them all. The report gives the online model's
error per path and mode (target: within 15%) and the coefficients of one fit over every step; `--write-table`
saves that fit as the table that seeds the cost model on this GPU.

    python -m benchmarks.step_costs                   # GPU: benchmarks/results/step_costs_<gpu>.json and .md
    python -m benchmarks.step_costs --write-table     # also valora/orchestrator/step_costs/<gpu>.json
    python -m benchmarks.step_costs --quick           # CPU, the tiny model of benchmarks/cpu_sweep.yaml
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

from benchmarks.common import run_info, write_result
from valora import LLM, LoRARequest, SamplingParams
from valora.bench.costs import analyse
from valora.bench.sweep import SweepConfig
from valora.orchestrator.cost_model import CostTable
from valora.orchestrator.policy import Decision, SchedulerView
from valora.orchestrator.valora_policy import ValoraPolicy
from valora.testing.families import FAMILIES
from valora.testing.images import random_image

ROOT = Path(__file__).parent
WORDS = ("the", "red", "car", "parks", "near", "a", "tall", "building", "while", "people", "walk", "on", "street")


class ForcedHot(ValoraPolicy):
    """The `valora` policy (its cost model and admission order) with the hot adapter set by the calibration."""

    hot: str | None = None

    def decide(self, view: SchedulerView) -> Decision:
        decision = super().decide(view)
        decision.hot = self.hot
        return decision


def waves(names: list[str], sizes: tuple[int, ...]) -> list[tuple[str, list[str]]]:
    """(label, adapter of each request) for every batch size and adapter mix."""
    out = []
    for n in sizes:
        four, sixteen = names[: min(4, len(names))], names[:16]
        out += [(f"b{n}-one", [names[0]] * n),
                (f"b{n}-four", [four[i % len(four)] for i in range(n)]),
                (f"b{n}-sixteen", [sixteen[i % len(sixteen)] for i in range(n)]),
                (f"b{n}-hot", [names[0] if i % 5 else sixteen[1 + i % (len(sixteen) - 1)] for i in range(n)])]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model on the CPU: checks that the script runs")
    p.add_argument("--write-table", action="store_true",
                   help="save the fit as valora/orchestrator/step_costs/<gpu>.json (the cost model's seed)")
    p.add_argument("--skip", type=int, default=100, help="leave out the first N steps (warm-up; default: 100)")
    args = p.parse_args()

    config = SweepConfig.load(ROOT / ("cpu_sweep.yaml" if args.quick else "e2e_sweep.yaml"))
    adapters = config.model.prepare()
    names = list(adapters)
    device = "cpu" if args.quick else "cuda"
    log = Path(tempfile.mkdtemp()) / "steps.jsonl.gz"
    llm = LLM(str(config.model.path), enable_lora=True, max_loras=len(names), device=device,
              max_lora_rank=max(config.model.adapters.ranks), max_num_seqs=8 if args.quick else 64,
              max_model_len=4096, num_kv_blocks=1024 if args.quick else None, scheduler="valora",
              step_log=str(log))
    engine = llm.engine
    policy = ForcedHot(rates=engine.policy.rates, costs=engine.policy.costs)
    engine.policy = policy
    requests = {n: LoRARequest(n, i + 1, str(path)) for i, (n, path) in enumerate(adapters.items())}
    image_prompt = FAMILIES["qwen2_vl"].image_prompt
    size = 56 if args.quick else 448
    start = time.perf_counter()
    plan = waves(names, (1, 4) if args.quick else (1, 8, 32, 64))
    for images in (False, True):
        for label, loras in plan:
            prompts = []
            for i, _ in enumerate(loras):
                text = "Describe the picture. " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40 + 7 * i))
                prompts.append({"prompt": f"{image_prompt} {text}", "multi_modal_data": {
                    "image": random_image(size, size, seed=i)}} if images else text)
            params = SamplingParams(temperature=0, max_tokens=4 if args.quick else 24, ignore_eos=True)
            for hot in (None, max(set(loras), key=loras.count)):
                policy.hot = hot
                llm.generate(prompts, params, [requests[n] for n in loras], use_tqdm=False)
            print(f"{label}{' +image' if images else ''}: {sum(engine.mode_steps.values())} steps so far", flush=True)
    seconds = time.perf_counter() - start
    info = run_info()
    table = CostTable.path_for(info["device"]) if args.write_table and not args.quick else None
    text, summary = analyse([log], args.skip, fit_out=table, device=info["device"], info=info)
    slug = "cpu" if args.quick else re.sub(r"[^a-z0-9]+", "_", info["device"].lower()).strip("_")
    path = write_result(f"step_costs_{slug}", {"seconds": seconds, "steps": sum(engine.mode_steps.values()),
                                               "mode_steps": engine.mode_steps, **summary})
    path.with_suffix(".md").write_text(text)
    print(text)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
