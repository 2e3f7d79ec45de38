"""Acceptance 4 of issue 22: the README's shell commands, taken literally, work on a fresh CPU clone or say on
their line (or the comment line above) what they need. Every command is checked: `valora` commands parse with the
real CLI parser and name files that exist, `make` targets exist, `pip` extras exist; the CPU sweep and its report
run here, literally, in a scratch directory with a scratch home."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from valora.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
NEEDS = re.compile(r"needs |minutes")  # what a line says when it cannot just run here
RUN_HERE = ("valora bench sweep benchmarks/cpu_sweep.yaml --workloads vqa",
            "valora bench report bench-results/cpu_sweep", "valora bench costs bench-results/cpu_sweep")


def _split_comment(line: str) -> tuple[str, str]:
    """(code, comment) of a shell line: the comment starts at a '#' outside quotes after whitespace."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i], line[i + 1 :].strip()
    return line, ""


def readme_commands() -> list[tuple[str, str]]:
    """(command, its notes: its comments and the comment lines just above it) for every shell command."""
    out: list[tuple[str, str]] = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        above: list[str] = []
        code_lines: list[str] = []
        notes: list[str] = []
        for line in block.splitlines():
            code, comment = _split_comment(line)
            if not code.strip():
                if comment and not code_lines and out and line.startswith(" "):  # a trailing comment, continued
                    out[-1] = (out[-1][0], f"{out[-1][1]} {comment}")
                elif comment:
                    above.append(comment)
                elif not code_lines:
                    above = []
                continue
            code_lines.append(code.rstrip())
            notes.append(comment)
            text = "\n".join(c.removesuffix("\\") for c in code_lines)
            try:
                shlex.split(text)
            except ValueError:  # an open quote: the command goes on
                continue
            if code_lines[-1].endswith("\\"):
                continue
            out.append((text, " ".join(n for n in [*above, *notes] if n)))
            above, code_lines, notes = [], [], []
    return out


COMMANDS = readme_commands()


def test_the_readme_has_commands():
    assert len(COMMANDS) >= 10 and all(cmd for cmd, _ in COMMANDS)


@pytest.mark.parametrize("command, notes", COMMANDS, ids=[c[:60] for c, _ in COMMANDS])
def test_each_command_works_or_says_what_it_needs(command, notes):
    argv = shlex.split(command)
    if argv[0] == "valora":
        build_parser().parse_args(argv[1:])  # every flag and subcommand exists (exits 2 otherwise)
        for arg in argv[1:]:
            if arg.startswith(("benchmarks/", "docs/")):
                assert (ROOT / arg).exists(), arg
    elif argv[0] == "make":
        assert subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True).returncode == 0
    elif argv[:3] == ["pip", "install", "-e"]:
        extras = re.fullmatch(r"\.\[(.*)\]", argv[3]).group(1).split(",")
        section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
        assert set(extras) <= set(re.findall(r"^(\w+) = ", section, re.M))
    runs_here = argv[0] in ("make", "pip") or command.startswith(RUN_HERE)
    assert runs_here or NEEDS.search(notes), f"{command!r} neither runs on a CPU clone nor says what it needs"


def test_the_cpu_sweep_and_its_report_run_literally(tmp_path):
    """`valora bench sweep benchmarks/cpu_sweep.yaml --workloads vqa`, then `valora bench report` and `valora bench
    costs` on its results, as the README writes them, from a directory holding the config, with a home of their own
    (the model is built)."""
    (tmp_path / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "cpu_sweep.yaml", tmp_path / "benchmarks")
    env = {**os.environ, "HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    out = {}
    for command in RUN_HERE:
        assert any(c.startswith(command) for c, _ in COMMANDS)
        quiet = ["--no-progress"] if shlex.split(command)[2] == "sweep" else []
        argv = [sys.executable, "-m", "valora.cli", *shlex.split(command)[1:], *quiet]
        done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        out[shlex.split(command)[2]] = done.stdout
        if shlex.split(command)[2] == "sweep":  # the sweep writes its step costs beside its report
            assert "Stalls" in (tmp_path / "bench-results" / "cpu_sweep" / "costs.md").read_text()
    assert (tmp_path / "bench-results" / "cpu_sweep" / "report.md").is_file() and "report.md" in out["report"]
    assert "predicted" in out["costs"], out["costs"]
