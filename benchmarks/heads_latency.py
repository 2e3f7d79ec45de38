"""Task heads vs decoding the answer as text (issue 8, acceptance 4): held-out accuracy and end-to-end latency per
request through the real server (HTTP, chat template, image decoding, engine), one request at a time.

    python -m benchmarks.heads_latency                      # CPU: the demo's small Qwen2-VL, trained adapters
    python -m benchmarks.heads_latency --shape 7b           # GPU: Qwen2-VL-7B shapes, random weights

CPU: `rotation` (a classification task) and `locate` (the box task) of the embedded suite are each trained twice
with the suite's recipe, once with a head and once answering in text (`valora adapters build --strategy per-task`),
and every held-out image is asked of both. Accuracy is measured on the server's replies.
GPU (`--shape 7b`): a random 7B-shaped checkpoint and an adapter with random heads, so only latency means
anything; the text answers are forced (ignore_eos) to the token counts of real answers under a real tokenizer
(`--text-tokens`; the demo's tiny tokenizer spells "turned left" in many more pieces, which would flatter heads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import httpx

from benchmarks.common import LM_LINEARS, QWEN2_VL_7B, write_result
from valora.multimodal.chat import image_data_url

TASKS = ("rotation", "locate")


def serve(model: Path, adapters: dict[str, Path], max_loras: int):
    from valora.config import CacheConfig, EngineConfig, LoRAConfig
    from valora.server.app import ServerConfig
    from valora.server.launch import LocalServer

    engine = EngineConfig(model=str(model), enable_lora=True, lora=LoRAConfig(max_loras=max_loras),
                          cache=CacheConfig(gpu_memory_utilization=0.5), max_model_len=4096)
    return LocalServer(engine, ServerConfig(served_model_names=["base"], lora_modules=list(
        (n, str(p)) for n, p in adapters.items())))


def ask(client: httpx.Client, url: str, body: dict) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = client.post(f"{url}/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return r.json(), elapsed


def latency(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"n": len(s), "mean_ms": 1e3 * statistics.fmean(s), "p50_ms": 1e3 * s[len(s) // 2],
            "p90_ms": 1e3 * s[int(len(s) * 0.9)]}


def reduction(head: dict, text: dict) -> dict:
    return {k: 1 - head[k] / text[k] for k in ("mean_ms", "p50_ms")}


# -- CPU: trained adapters --------------------------------------------------------------------------------------
def chat(model: str, image_url: str, question: str, **options) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}], **options}


def measure_trained(client: httpx.Client, url: str, task, served: str, limit: int, warmup: int) -> dict:
    """Every held-out image (up to `limit`) asked of adapter `served`, one at a time, scored on the reply."""
    from valora.outputs import HeadOutput

    examples = task.data.splits["test"]
    bodies = [chat(served, image_data_url(img), task.question, temperature=0, max_tokens=24)
              for img in examples.images[: min(limit, len(examples))]]
    for body in bodies[:warmup]:
        ask(client, url, body)
    marks, seconds, tokens = [], [], []
    for body, target in zip(bodies, examples.targets):
        reply, s = ask(client, url, body)
        choice = reply["choices"][0]
        h = choice.get("head")
        answer = HeadOutput(h["name"], h["label"], h["scores"], h["box"]) if h else choice["message"]["content"]
        marks.append(task.score(answer, target))
        seconds.append(s)
        tokens.append(reply["usage"]["completion_tokens"])
    ious = [v for _, v in marks if v is not None]
    return {"accuracy": sum(ok for ok, _ in marks) / len(marks), "mean_iou": statistics.fmean(ious) if ious else None,
            "completion_tokens": statistics.fmean(tokens), **latency(seconds)}


def cpu(args, save) -> dict:
    from valora.adaptgen.base import demo_base
    from valora.adaptgen.builder import BuildConfig, build
    from valora.adaptgen.cli import SUITES
    from valora.adaptgen.spec import load_suite
    from valora.adaptgen.tasks import Task

    embedded = load_suite(SUITES / "embedded.yaml")
    pairs = []
    for name in TASKS:
        t = embedded.task(name)
        pairs += [t, replace(t, name=f"{name}-text", answer="text")]
    suite = replace(embedded, tasks=tuple(pairs))
    cache = args.workdir / "cache"
    base = demo_base(cache)
    report = build(BuildConfig(suite, base, args.workdir / "heads", cache, strategy="per-task"))
    adapters = {a["tasks"][0]: Path(a["path"]) for a in report["adapters"]}
    tasks = {t.name: Task.load(t, suite.image_size) for t in pairs}
    results: dict = {"shape": "demo (trained)", "base": str(base), "tasks": {}}
    with serve(base, adapters, len(adapters)) as url, httpx.Client(timeout=120) as client:
        for name in TASKS:
            row = {variant: measure_trained(client, url, tasks[served], served, args.limit, args.warmup)
                   for variant, served in (("head", name), ("text", f"{name}-text"))}
            row["latency_reduction"] = reduction(row["head"], row["text"])
            results["tasks"][name] = row
            print(name, json.dumps(row, indent=1), flush=True)
            save(results)  # after every task, so a run cut short keeps what it measured
    return results


# -- GPU: a 7B-shaped random model ------------------------------------------------------------------------------
def random_setup(workdir: Path, shape: str) -> tuple[Path, Path]:
    import torch

    from valora.adaptgen.datasets import ROTATIONS
    from valora.heads import HeadConfig, TaskHead, save_heads
    from valora.testing.checkpoints import build_qwen2_vl, peft_target_regex, save_random_adapter

    model = workdir / f"qwen2-vl-{shape}-random"
    if not (model / "config.json").exists():
        if shape == "7b":
            build_qwen2_vl(model, large=True, dtype=torch.bfloat16, device="cuda", max_pixels=448 * 448,
                           **QWEN2_VL_7B)
        else:  # a dry run of the same path anywhere
            build_qwen2_vl(model, max_pixels=448 * 448)
    adapter = workdir / f"adapter-{shape}"
    if not (adapter / "heads.json").exists():
        save_random_adapter(model, adapter, r=16, target_modules=peft_target_regex(LM_LINEARS),
                            device="cuda" if shape == "7b" else "cpu")
        from transformers import AutoConfig

        hidden = AutoConfig.from_pretrained(model).text_config.hidden_size
        torch.manual_seed(0)
        save_heads(adapter, {"rotation": TaskHead(HeadConfig("rotation", "classify", hidden, 256, ROTATIONS)),
                             "locate": TaskHead(HeadConfig("locate", "box", hidden, 256))})
    return model, adapter


def gpu(args, save) -> dict:
    from valora.adaptgen.datasets import rotation

    forced = dict(args.text_tokens)
    model, adapter = random_setup(args.workdir, args.shape)
    image = image_data_url(rotation(56, 0).splits["test"].images[0].resize((448, 448)))
    results: dict = {"shape": f"Qwen2-VL-{args.shape} random", "image": "448x448", "forced_text_tokens": forced,
                     "tasks": {}}
    with serve(model, {"a": adapter}, 1) as url, httpx.Client(timeout=300) as client:
        for name, question in zip(TASKS, ("How is the digit turned?", "Where is the digit?")):
            bodies = {"head": chat("a", image, question, head=name),
                      "text": chat("a", image, question, temperature=0, max_tokens=forced[name], ignore_eos=True)}
            row = {}
            for variant, body in bodies.items():
                for _ in range(args.warmup):
                    ask(client, url, body)
                seconds, tokens = [], []
                for _ in range(args.limit):
                    reply, s = ask(client, url, body)
                    seconds.append(s)
                    tokens.append(reply["usage"]["completion_tokens"])
                row[variant] = {"completion_tokens": statistics.fmean(tokens), "prompt_tokens":
                                reply["usage"]["prompt_tokens"], **latency(seconds)}
            row["latency_reduction"] = reduction(row["head"], row["text"])
            results["tasks"][name] = row
            print(name, json.dumps(row, indent=1), flush=True)
            save(results)  # after every task, so a run cut short keeps what it measured
    return results


def _lengths(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["trained", "7b", "tiny"], default="trained",
                    help="trained: the CPU run; 7b: random Qwen2-VL-7B shapes (GPU); tiny: that path, small")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/valora-heads"))
    ap.add_argument("--limit", type=int, default=400, help="requests per variant (default: 400)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--name", default=None, help="results file name (default: heads_latency_<shape>)")
    ap.add_argument("--text-tokens", type=_lengths, default=_lengths("rotation=3,locate=16"), metavar="T=N,...",
                    help="random models: tokens each text answer is forced to, end of turn included (default: "
                         "rotation=3,locate=16: a label of one or two words; a box as '(x1,y1),(x2,y2)' with one "
                         "token per digit and sign, as Qwen2's tokenizer splits them)")
    args = ap.parse_args()
    name = args.name or f"heads_latency_{'cpu' if args.shape == 'trained' else args.shape}"

    def save(result: dict) -> None:
        print(f"written {write_result(name, {**result, 'limit': args.limit})}", flush=True)

    (cpu if args.shape == "trained" else gpu)(args, save)


if __name__ == "__main__":
    main()
