"""`valora generate MODEL --prompt ... [--image PATH] [--video PATH] [--lora name=path]`: one offline generation."""

from __future__ import annotations

import argparse
from pathlib import Path

from valora.errors import UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model directory (Qwen2-VL, Qwen2.5-VL, LLaVA or InternVL)")
    p.add_argument("--prompt", required=True, help="user message (the chat template is applied)")
    p.add_argument("--image", action="append", default=[], help="image file to attach (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (MP4, WebM, ...) to attach (repeatable)")
    p.add_argument("--lora", default=None, metavar="NAME=PATH", help="PEFT adapter directory to use")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="auto", help="auto, float16, bfloat16 or float32 (default: auto)")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length, prompt plus output (default: the model's)")


def run(args: argparse.Namespace) -> int:
    from valora import LLM, LoRARequest, SamplingParams
    from valora.lora.adapter import check_adapter_dir

    for flag, paths in (("--image", args.image), ("--video", args.video)):  # checked before the model loads
        for path in paths:
            if not Path(path).is_file():
                raise UserError(f"{flag} {path}: no such file")
    lora = None
    if args.lora:
        name, sep, path = args.lora.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--lora takes NAME=PATH, got {args.lora!r}")
        check_adapter_dir(name, path, max_rank=64)
        lora = LoRARequest(name, 1, path)
    llm = LLM(args.model, enable_lora=lora is not None, dtype=args.dtype, device=args.device,
              max_model_len=args.max_model_len)
    content = [{"type": "image", "image": path} for path in args.image]
    content += [{"type": "video", "video": path} for path in args.video] + [{"type": "text", "text": args.prompt}]
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    out = llm.chat([{"role": "user", "content": content}], params, lora_request=lora, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
