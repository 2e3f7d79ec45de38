"""`valora generate MODEL --prompt ... [--image PATH] [--lora name=path]`: one offline generation."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model directory")
    p.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    p.add_argument("--image", action="append", default=[], help="image file to attach (repeatable)")
    p.add_argument("--lora", default=None, metavar="NAME=PATH", help="PEFT adapter directory to use")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto")


def run(args: argparse.Namespace) -> int:
    from valora import LLM, LoRARequest, SamplingParams

    lora = None
    if args.lora:
        name, sep, path = args.lora.partition("=")
        if not sep:
            raise SystemExit("--lora takes NAME=PATH")
        lora = LoRARequest(name, 1, path)
    llm = LLM(args.model, enable_lora=lora is not None, dtype=args.dtype)
    content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": args.prompt}]
    out = llm.chat([{"role": "user", "content": content}], SamplingParams(temperature=args.temperature,
                   max_tokens=args.max_tokens), lora_request=lora, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
