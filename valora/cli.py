"""`valora <command>`: each command lives in its own module with `add_arguments(parser)` and `run(args) -> int`.

Command modules keep heavy imports inside `run`, so `valora --help` stays fast. One error path for every command:
a user's mistake (a bad flag, path, input or adapter: `UserError`, and argparse's own errors) prints one line that
says what is wrong and exits 2, with its traceback only under `--log-level DEBUG`; anything else is a bug and prints
its traceback; Ctrl-C exits quietly with 130.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from valora.errors import UserError

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("valora.generate_cli", "run an offline generation on a model directory"),
    "serve": ("valora.serving.cli", "start the OpenAI-compatible server for a model and its LoRA adapters"),
    "demo": ("valora.demo.cli", "train a small vision model with LoRA adapters on digit images and serve it"),
    "adapters": ("valora.adaptgen.cli", "build LoRA adapters (and task heads) from vision tasks with accuracy floors"),
    "bench": ("valora.bench.cli", "trace-driven benchmark of the server under each scheduler: run, sweep, report"),
    "tune-kernels": ("valora.lora.tuning.cli", "time the LoRA kernel plans on this GPU and write its table"),
}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_ENV = "VALORA_LOGGING_LEVEL"
logger = logging.getLogger("valora")


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("valora")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        from valora import __version__

        return __version__


def _log_level(text: str) -> str:
    if text.upper() not in LEVELS:
        raise argparse.ArgumentTypeError(f"invalid level {text!r}; choose one of {', '.join(LEVELS)}")
    return text.upper()


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser under `parser`, nested subcommands included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [sub, *_subparsers(sub)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="valora", description="Serve one multimodal model with many LoRA adapters.")
    parser.add_argument("--version", action="version", version=f"valora {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    level_help = f"logging level: {', '.join(LEVELS)} (default: ${LOG_ENV}, else INFO)"
    parser.add_argument("--log-level", type=_log_level, default=None, metavar="LEVEL", help=level_help)
    for p in _subparsers(parser):  # accepted before or after the subcommand, as vLLM's is
        p.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, metavar="LEVEL", help=level_help)
    return parser


def configure_logging(level: str | None) -> str:
    """The level from the flag, else $VALORA_LOGGING_LEVEL, else INFO; one line per record, as vLLM's."""
    if level is None:
        env = os.environ.get(LOG_ENV, "INFO")
        try:
            level = _log_level(env)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"valora: error: ${LOG_ENV}: {e}") from None
    logging.basicConfig(level=level, format="%(levelname)s %(asctime)s [%(name)s] %(message)s",
                        datefmt="%m-%d %H:%M:%S", force=True)
    return level


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = configure_logging(args.log_level)
    command = f"valora {args.command}"
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)  # end the line a ^C was echoed on
        return 130
    except UserError as e:
        if level == "DEBUG":
            logger.exception("%s failed", command)
        print(f"{command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
