"""The server's answers to a fixed set of requests, to show a change leaves them alone (issue 23, acceptance 1).

    python -m benchmarks.server_answers OUT.json              # serve the checkout in the current directory
    python -m benchmarks.server_answers --compare A.json B.json

Run the first form in two checkouts (a `git worktree` of the commit before, and this one) with the same
`--workdir`, so both serve the same tiny Qwen2-VL and adapters (built there, seeded, on first use), then compare:
the exit status is 1 when any answer differs. The requests: per model (the base and two adapters) a chat with an
image, a text chat with a system turn, two completions in one request (all temperature 0), and a seeded sampled
completion; 12 requests, 15 answers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

from valora.bench.server import ServeProcess
from valora.multimodal.chat import image_data_url
from valora.testing.images import random_image

ADAPTERS = ("a0", "a1")


def build(workdir: Path) -> tuple[Path, dict[str, Path]]:
    from valora.testing.checkpoints import build_model, build_peft_adapter, peft_target_regex
    from valora.testing.families import LM_LINEARS

    model = workdir / "qwen2_vl"
    if not (model / "config.json").exists():
        build_model("qwen2_vl", model, initializer_range=0.05)
    adapters = {name: workdir / name for name in ADAPTERS}
    for i, path in enumerate(adapters.values()):
        if not (path / "adapter_config.json").exists():
            build_peft_adapter(model, path, r=4, target_modules=peft_target_regex(LM_LINEARS), seed=50 + i)
    return model, adapters


def requests() -> list[tuple[str, dict]]:
    image = image_data_url(random_image(56, 84, seed=3))
    out = []
    for model in ("base", *ADAPTERS):
        greedy = {"model": model, "temperature": 0, "max_tokens": 12}
        out += [
            ("/v1/chat/completions", greedy | {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "Describe it."}]}]}),
            ("/v1/chat/completions", greedy | {"messages": [{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "What is a dog?"}]}),
            ("/v1/completions", greedy | {"prompt": ["a red car", "the sky is"]}),
            ("/v1/completions", greedy | {"temperature": 0.8, "seed": 7, "prompt": "once upon a time"}),
        ]
    return out


def answers(workdir: Path) -> list[dict]:
    model, adapters = build(workdir)
    modules = [f"{name}={path}" for name, path in adapters.items()]
    args = ["--served-model-name", "base", "--device", "cpu", "--num-kv-blocks", "512", "--max-model-len", "1024",
            "--lora-modules", *modules]
    log = Path(tempfile.mkdtemp()) / "server.log"
    with ServeProcess(model, args, log) as url:
        out = []
        for path, body in requests():
            r = httpx.post(url + path, json=body, timeout=120)
            choices = r.json().get("choices", [])
            texts = [c.get("text", c.get("message", {}).get("content")) for c in choices]
            out.append({"path": path, "model": body["model"], "status": r.status_code, "answers": texts,
                        "usage": r.json().get("usage")})
    return out


def compare(a: Path, b: Path) -> int:
    left, right = json.loads(a.read_text()), json.loads(b.read_text())
    differ = [(x, y) for x, y in zip(left, right) if x != y] + [(x, None) for x in left[len(right):]]
    for x, y in differ:
        print(f"differs: {x}\n     vs: {y}")
    print(f"{len(left) - len(differ)} of {len(left)} requests answered identically")
    return 1 if differ or len(left) != len(right) else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", type=Path, help="where to write this checkout's answers (JSON)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "valora-server-answers",
                   help="the tiny model and adapters, shared by the checkouts compared")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"))
    args = p.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.out is None:
        p.error("give OUT.json, or --compare A B")
    args.out.write_text(json.dumps(answers(args.workdir), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
