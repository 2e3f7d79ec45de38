"""Acceptance 4: `valora demo` trains on real digits, serves the base model and three adapters, and prints
held-out accuracy of at least 90% per adapter task while the base model cannot do those tasks; the second
run reuses the cache."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from valora.demo.artifacts import DemoRecipe, cached
from valora.demo.client import Query, Reply
from valora.demo.data import load_digits, split
from valora.demo.report import render, score
from valora.demo.tasks import ADAPTER_TASKS, BASE_TASK, NUMBER_WORDS, TASKS
from valora.demo.train import TrainSpec

ROW = re.compile(r"^(?P<summary>.+?)\s{2,}(?P<model>\S+)\s+(?P<acc>[\d.]+)%\s+(?P<base>[\d.]+%|-)\s")


def test_split_is_stratified_and_disjoint():
    data = load_digits()
    train, test = split(data, 0.2, seed=0)
    assert len(data) == 1797 and len(train) + len(test) == len(data)
    assert {id(i) for i in train.images}.isdisjoint(id(i) for i in test.images)
    for digit in range(10):
        share = test.labels.count(digit) / (train.labels.count(digit) + test.labels.count(digit))
        assert 0.18 < share < 0.22
    assert train.images[0].size == (56, 56) and train.images[0].mode == "RGB"


def test_tasks_have_distinct_answers():
    for task in TASKS:
        assert len({task.answer(d) for d in range(10)}) == (2 if task.name == "parity" else 10)
    for task in ADAPTER_TASKS:  # the base model's answers (the digit) are never right for an adapter task
        assert all(task.answer(d) != BASE_TASK.answer(d) for d in range(10))


def test_recipe_fingerprint_tracks_the_recipe():
    recipe = DemoRecipe()
    assert recipe.fingerprint() == DemoRecipe().fingerprint()
    shorter = dataclasses.replace(recipe, base=TrainSpec(steps=10, lr=1e-3))
    assert shorter.fingerprint() != recipe.fingerprint()


def test_cached_adapters_name_the_cached_base(tmp_path):
    """PEFT wrote the staging folder's path into each adapter's config; the cache points them at its base."""
    recipe = DemoRecipe()
    root = tmp_path / f"demo-{recipe.fingerprint()}"
    (root / "manifest.json").parent.mkdir(parents=True)
    (root / "manifest.json").write_text("{}")
    for task in recipe.adapter_tasks:
        (root / "adapters" / task.name).mkdir(parents=True)
        (root / "adapters" / task.name / "adapter_config.json").write_text(
            '{"base_model_name_or_path": "/tmp/demo-x.tmp-123/base", "r": 8}')
    arts = cached(recipe, tmp_path)
    for path in arts.adapters.values():
        config = json.loads((path / "adapter_config.json").read_text())
        assert config == {"base_model_name_or_path": str(root / "base"), "r": 8}


def test_score_and_render():
    labels = [3, 4]
    parity = ADAPTER_TASKS[0]
    replies = [Reply(Query(BASE_TASK, "base", 0), "3", 0.1), Reply(Query(BASE_TASK, "base", 1), "9", 0.3),
               Reply(Query(parity, "parity", 0), "odd", 0.2), Reply(Query(parity, "parity", 1), "even", 0.2),
               Reply(Query(parity, "base", 0), "3", 0.1), Reply(Query(parity, "base", 1), "4", 0.1)]
    rows = score(replies, labels, "base")
    assert [(r.model, r.accuracy, r.base_accuracy) for r in rows] == [("base", 0.5, None), ("parity", 1.0, 0.0)]
    assert rows[1].examples[0] == (3, "odd", "3")
    table = render(rows)
    assert "odd or even" in table and "100.0%" in table and "3->odd (3)" in table


@pytest.mark.slow
def test_demo_cold_then_warm(tmp_path):
    cmd = [sys.executable, "-m", "valora.cli", "demo", "--cache-dir", str(tmp_path)]
    t0 = time.perf_counter()
    cold = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    cold_s = time.perf_counter() - t0
    assert cold.returncode == 0, cold.stdout + cold.stderr[-3000:]
    rows = {m["model"]: m for m in map(ROW.match, cold.stdout.splitlines()) if m}
    assert set(rows) == {"qwen2-vl-digits", *(t.name for t in ADAPTER_TASKS)}, cold.stdout
    for task in ADAPTER_TASKS:
        row = rows[task.name]
        assert float(row["acc"]) >= 90.0, cold.stdout
        assert float(row["base"].rstrip("%")) <= 20.0, cold.stdout  # the base model does not do this task
    assert float(rows["qwen2-vl-digits"]["acc"]) >= 90.0
    assert "adapter 'parity'" in cold.stderr  # training showed progress bars

    # The warm run reuses the cache, prints the same table, then (--serve) keeps serving until interrupted.
    t0 = time.perf_counter()
    err_path = tmp_path / "warm.err"  # a file, not a pipe: nobody reads stderr while the server runs
    with err_path.open("w") as err_file:
        # Started with SIGINT at its default: a suite run in the background of a non-interactive shell has it
        # ignored (POSIX), children inherit that, and Python then installs no KeyboardInterrupt handler, so the
        # Ctrl-C below would be lost (the server kept running until the test's timeout).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            warm = subprocess.Popen([*cmd, "--serve"], stdout=subprocess.PIPE, stderr=err_file, text=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            out = []
            for line in warm.stdout:
                out.append(line)
                if "The server keeps running at" in line:
                    break
            warm_s = time.perf_counter() - t0
            _check_warm("".join(out), rows)
        finally:
            warm.send_signal(signal.SIGINT)
            rest, _ = warm.communicate(timeout=60)
    err = err_path.read_text()
    assert warm.returncode == 0, rest + err[-3000:]
    assert "adapter 'parity'" not in err and warm_s < cold_s


def _check_warm(text: str, cold_rows: dict) -> None:
    """Same accuracies as the cold run, and the server that stays up answers as the usage text says."""
    assert "Using the model and adapters cached" in text, text
    rows = {m["model"]: m for m in map(ROW.match, text.splitlines()) if m}
    assert {k: (m["acc"], m["base"]) for k, m in rows.items()} == {k: (m["acc"], m["base"])
                                                                   for k, m in cold_rows.items()}
    url = re.search(r"running at (http://\S+)", text)[1]
    sample = re.search(r"Sample digits to try: (\S+)", text)[1]
    image = "data:image/png;base64," + base64.b64encode(Path(sample, "digit-7.png").read_bytes()).decode()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="spell", temperature=0, max_tokens=8, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": "Spell the digit as a word."}]}])
    assert r.choices[0].message.content in NUMBER_WORDS
