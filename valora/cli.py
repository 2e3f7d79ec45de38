"""`valora <command>`: each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`.

Command modules keep heavy imports inside `run`, so `valora --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("valora.generate_cli", "run an offline generation on a model directory"),
    "serve": ("valora.server.cli", "start the OpenAI-compatible server for a model and its LoRA adapters"),
    "demo": ("valora.demo.cli", "train a small vision model with LoRA adapters on digit images and serve it"),
    "adapters": ("valora.adaptgen.cli", "build LoRA adapters (and task heads) from vision tasks with accuracy floors"),
    "bench": ("valora.bench.cli", "trace-driven benchmark of the server under each scheduler: run, sweep, report"),
    "tune-kernels": ("valora.lora.tuning.cli", "grid-search the LoRA kernel tiles on this GPU and write its table"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="valora", description="Serve one multimodal model with many LoRA adapters.")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
