"""Acceptance 1, 2 and 5 at CI size: `valora adapters build` on three real digit tasks (short trainings, a base
model trained for 100 steps) packs them into fewer adapters than tasks, every task at or above its floor; a
higher floor or a smaller rank forces more adapters; a re-run, or a run after an interruption, redoes nothing
already done and gives the same result. Every build of this module shares one cache, so nothing is trained twice."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from valora.adaptgen.base import demo_base
from valora.adaptgen.cli import SUITES
from valora.adaptgen.spec import load_suite
from valora.cli import main

CI = load_suite(SUITES / "ci.yaml")
FLOORS = {t.name: t.floor for t in CI.tasks}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adaptgen-cache")


@pytest.fixture(scope="module")
def base(cache) -> Path:
    return demo_base(cache, steps=100)


def build(base: Path, out: Path, cache: Path, *extra: str) -> tuple[int, dict]:
    rc = main(["--log-level", "WARNING", "adapters", "build", "ci", "--base", str(base), "--out", str(out),
               "--cache-dir", str(cache), *extra])
    return rc, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def ci_build(base, cache, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ci-build")
    rc, report = build(base, out, cache)
    assert rc == 0
    return out, report


def test_fewer_adapters_than_tasks_and_every_floor_met(ci_build):
    out, r = ci_build
    assert len(r["adapters"]) < len(CI.tasks) and r["below_floor"] == []
    assert sorted(t for a in r["adapters"] for t in a["tasks"]) == sorted(FLOORS)
    for a in r["adapters"]:
        for t in a["tasks"]:
            assert a["validation"][t] >= FLOORS[t]
            assert a["held_out"][t]["accuracy"] > r["base_held_out"][t]["accuracy"] + 0.3  # the adapter is the gain
            assert a["held_out"][t]["n"] == next(x for x in r["tasks"] if x["name"] == t)["sizes"]["test"]
        assert a["training_seconds"] > 0
        d = Path(a["path"])
        assert (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
        assert (d / "heads.json").is_file() == bool(a["heads"])
    md = (out / "report.md").read_text()
    for t in FLOORS:
        assert f"| {t} |" in md
    assert "base model (held-out)" in md and "--lora-modules adapter-1=" in md


def test_served_like_any_adapter(ci_build, base):
    """The built directories load in the engine as `valora serve --lora-modules` would, heads included."""
    from valora import LLM, LoRARequest
    from valora.heads import HeadParams

    _, r = ci_build
    headed = next(a for a in r["adapters"] if a["heads"])
    llm = LLM(str(base), enable_lora=True, device="cpu", num_kv_blocks=64)
    prompt = llm.chat_prompt([{"role": "user", "content": [{"type": "image", "image": _digit()},
                                                           {"type": "text", "text": "How is the digit turned?"}]}])
    out = llm.generate([prompt], HeadParams(), LoRARequest("h", 1, headed["path"]), use_tqdm=False)[0]
    assert out.outputs[0].head.head == headed["heads"][0] and out.outputs[0].token_ids == []


def _digit():
    from valora.adaptgen.datasets import rotation

    return rotation(56, 0).splits["test"].images[0]


def test_a_fused_adapter_never_ships_a_task_under_its_floor(ci_build):
    _, r = ci_build
    for e in r["fusion_log"]:
        if e["action"] == "fused":
            assert not e["below"]
        if e["below"] and e["action"] == "rolled back":
            nxt = r["fusion_log"][r["fusion_log"].index(e) + 1]
            assert (nxt["task"], nxt["action"]) == (e["task"], "opened")


def test_higher_floor_forces_more_adapters(ci_build, base, cache, tmp_path):
    _, low = ci_build
    rc, high = build(base, tmp_path, cache, "--floor", "0.99")
    assert rc == 1  # no task reaches 99% even alone: each ships alone, and the command says so
    assert len(high["adapters"]) > len(low["adapters"]) and len(high["adapters"]) == len(CI.tasks)
    assert sorted(high["below_floor"]) == sorted(FLOORS)
    assert high["trainings"]["reused"] >= 2  # the first task alone and the first fusion came from the cache


def test_smaller_rank_forces_more_adapters(ci_build, base, cache, tmp_path):
    _, r8 = ci_build
    rc, r1 = build(base, tmp_path, cache, "--rank", "1")
    assert len(r1["adapters"]) > len(r8["adapters"])
    for a in r1["adapters"]:  # whatever shipped fused still meets every floor
        assert len(a["tasks"]) == 1 or all(a["validation"][t] >= FLOORS[t] for t in a["tasks"])
    assert (rc == 1) == bool(r1["below_floor"])


def test_rerun_and_interrupted_run_resume(ci_build, base, cache, tmp_path):
    out, first = ci_build
    rc, again = build(base, out, cache)
    assert rc == 0 and again["trainings"]["run"] == 0 and _results(again) == _results(first)
    # An interruption: the last adapter trained never made it to the cache, a half-written one did.
    part = tmp_path / "cache"
    shutil.copytree(cache, part)
    last = first["adapters"][-1]
    state = _state_of(part, last["tasks"])
    shutil.rmtree(state)
    (part / "states" / f"{state.name}.tmp-12345").mkdir()
    for f in (part / "scores").glob(f"{state.name}-*"):
        f.unlink()
    rc, resumed = build(base, tmp_path / "out", part)
    assert rc == 0 and resumed["trainings"]["run"] == 1 and _results(resumed) == _results(first)


def _state_of(cache: Path, tasks: list[str]) -> Path:
    for s in (cache / "states").iterdir():
        if (s / "state.json").is_file() and json.loads((s / "state.json").read_text())["tasks"] == tasks:
            return s
    raise AssertionError(f"no state for {tasks}")


def _results(r: dict) -> list:
    return [(a["tasks"], a["validation"], a["held_out"]) for a in r["adapters"]]


def test_bad_task_file(tmp_path, capsys):
    bad = tmp_path / "tasks.yaml"
    bad.write_text("tasks: [{name: x, dataset: {kind: digits}, prompt: p, floor: 2}]")
    assert main(["adapters", "build", str(bad), "--base", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "floor must be a number in [0, 1]" in capsys.readouterr().err
