"""The task file: what is accepted, what is refused and why, and the command-line overrides."""

from __future__ import annotations

import re

import pytest

from valora.adaptgen.cli import SUITES
from valora.adaptgen.spec import SpecError, fingerprint, load_suite, parse_suite

TASK = {"name": "parity", "dataset": {"kind": "digits", "answer": "parity"}, "prompt": "Odd or even?", "floor": 0.9}


def test_packaged_suites_parse():
    embedded = load_suite(SUITES / "embedded.yaml")
    assert len(embedded.tasks) >= 6
    assert {t.answer for t in embedded.tasks} == {"text", "head"}
    assert {t.dataset for t in embedded.tasks} >= {"digits", "count", "rotation", "locate", "scenes"}
    assert any(t.teacher for t in embedded.tasks) and embedded.adapter.vision_modules
    assert len(load_suite(SUITES / "ci.yaml").tasks) == 3


def test_defaults_and_options():
    suite = parse_suite({"tasks": [TASK], "adapter": {"r": 4, "vision_modules": ["qkv"]}, "train": {"steps": 9}})
    t = suite.tasks[0]
    assert (t.dataset, t.options, t.answer, t.teacher) == ("digits", {"answer": "parity"}, "text", None)
    assert suite.adapter.r == 4 and suite.adapter.vision_modules == ("qkv",) and suite.adapter.train.steps == 9
    assert "visual" in suite.adapter.target_modules and "language_model" in suite.adapter.target_modules


@pytest.mark.parametrize("change, message", [
    ({"floor": 1.5}, "floor must be a number in"),
    ({"answer": "logits"}, "answer must be 'text' or 'head'"),
    ({"name": "a b"}, "name must be letters"),
    ({"dataset": "digits"}, "'dataset' must be a mapping with a 'kind'"),
    ({"colour": "red"}, "unknown field(s) colour"),
    ({"options": {"answer": "word"}}, "dataset options go inside 'dataset'"),
    ({"teacher": {"model": "resnet"}}, "teacher needs model 'logistic'"),
    ({"teacher": {"labeled": 0.1}}, "unknown field(s) labeled"),
])
def test_bad_tasks_are_refused_by_name(change, message):
    with pytest.raises(SpecError, match=re.escape(message)) as e:
        parse_suite({"tasks": [{**TASK, **change}]})
    assert "tasks[0]" in str(e.value)


def test_bad_files_are_refused():
    with pytest.raises(SpecError, match="non-empty 'tasks'"):
        parse_suite({"tasks": []})
    with pytest.raises(SpecError, match="unique"):
        parse_suite({"tasks": [TASK, TASK]})
    with pytest.raises(SpecError, match="at least one module"):
        parse_suite({"tasks": [TASK], "adapter": {"lm_modules": []}})
    with pytest.raises(SpecError, match="train: unknown field"):
        parse_suite({"tasks": [TASK], "train": {"epochs": 3}})


def test_overrides():
    suite = parse_suite({"tasks": [TASK, {**TASK, "name": "other", "floor": 0.5}]})
    o = suite.with_overrides(tasks=["other"], steps=7, rank=2, floor=0.3, seed=5)
    assert [t.name for t in o.tasks] == ["other"] and o.tasks[0].floor == 0.3
    assert (o.adapter.train.steps, o.adapter.r, o.adapter.train.seed) == (7, 2, 5)
    assert suite.with_overrides() == suite
    with pytest.raises(SpecError, match="no task named nope"):
        suite.with_overrides(tasks=["nope"])
    assert fingerprint(o) != fingerprint(suite) and fingerprint(suite) == fingerprint(parse_suite(
        {"tasks": [TASK, {**TASK, "name": "other", "floor": 0.5}]}))
