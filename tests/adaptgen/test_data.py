"""The embedded data: real images from pip packages, one split rule for every task, and teachers."""

from __future__ import annotations

import numpy as np
import pytest

from valora.adaptgen import datasets
from valora.adaptgen.sources import HELD_OUT, column_ranges, mnist, sklearn_digits
from valora.adaptgen.spec import TaskSpec, TeacherSpec
from valora.adaptgen.tasks import Task
from valora.outputs import HeadOutput


@pytest.mark.parametrize("source", [sklearn_digits, mnist])
def test_held_out_is_the_last_fifth_of_each_class_by_index(source):
    src = source()
    split = src.split
    assert len(np.intersect1d(split.train, split.test)) == len(np.intersect1d(split.val, split.test)) == 0
    assert len(split.train) + len(split.val) + len(split.test) == len(src.labels)
    for c in range(10):
        idx = np.flatnonzero(src.labels == c)
        held = np.intersect1d(split.test, idx)
        assert len(held) == round(len(idx) * HELD_OUT) and (held == idx[-len(held):]).all()
        assert np.intersect1d(split.val, idx).max() < held.min() and np.intersect1d(split.train, idx).max() < held.min()


def test_pictures_split_by_column():
    r = column_ranges(512)
    assert r["train"][0] == 0 and r["train"][1] == r["val"][0] and r["val"][1] == r["test"][0] and r["test"][1] == 512
    assert r["test"][1] - r["test"][0] == round(512 * HELD_OUT)


def test_generated_tasks_use_only_their_split(monkeypatch):
    """Canvases of the held-out split are made of held-out digits only: dim the held-out digits, paint every
    other digit solid white, and look for white."""
    src = sklearn_digits()
    marked = np.minimum(src.images, 200)
    marked[np.setdiff1d(np.arange(len(marked)), src.split.test)] = 255
    monkeypatch.setattr(datasets, "_source", lambda name: type(src)(marked, src.labels))
    for kind in ("count", "locate", "compare"):
        data = datasets.generate(kind, 56, 0, {"source": "sklearn", "train": 5, "val": 5, "test": 20})
        for img in data.splits["test"].images:
            assert np.asarray(img).max() < 255, kind  # no training or validation digit on a held-out canvas
        assert any(np.asarray(img).max() == 255 for img in data.splits["train"].images)


def test_generators_are_deterministic_and_well_formed():
    a = datasets.generate("count", 56, 0, {"train": 20, "val": 5, "test": 5})
    b = datasets.generate("count", 56, 0, {"train": 20, "val": 5, "test": 5})
    c = datasets.generate("count", 56, 1, {"train": 20, "val": 5, "test": 5})
    as_bytes = lambda d: [np.asarray(i).tobytes() for i in d.splits["train"].images]
    assert as_bytes(a) == as_bytes(b) and as_bytes(a) != as_bytes(c) and a.splits["train"].targets == b.splits[
        "train"].targets
    loc = datasets.generate("locate", 56, 0, {"train": 10, "val": 2, "test": 2})
    for img, (x1, y1, x2, y2) in zip(loc.splits["train"].images, loc.splits["train"].targets):
        ink = np.argwhere(np.asarray(img)[..., 0] > 64)
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 and img.size == (56, 56)
        assert (ink.min(0) == [round(y1 * 56), round(x1 * 56)]).all()
    rot = datasets.generate("rotation", 56, 0, {})
    assert rot.labels == datasets.ROTATIONS and set(rot.splits["val"].targets) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="unknown dataset kind"):
        datasets.generate("faces", 56, 0, {})
    with pytest.raises(ValueError, match="unexpected keyword"):
        datasets.generate("count", 56, 0, {"colour": 1})


def test_teacher_labels_the_unlabelled_training_images_only():
    spec = TaskSpec("m", "digits", "Which digit?", 0.5, {"source": "mnist"}, teacher=TeacherSpec(labelled=0.1))
    task = Task.load(spec, 56)
    truth = datasets.generate("digits", 56, 0, {"source": "mnist"})
    train = task.data.splits["train"]
    assert task.teacher.labelled == 340 and task.teacher.relabelled == 3060 and 0.7 < task.teacher.agreement < 0.98
    agree = np.mean(np.asarray(train.targets) == np.asarray(truth.splits["train"].targets))
    assert task.teacher.agreement < agree < 1  # the labelled tenth keeps its true labels
    assert train.soft.shape == (3400, 10) and np.allclose(train.soft.sum(-1), 1, atol=1e-5)
    for s in ("val", "test"):  # measured against the truth
        assert task.data.splits[s].targets == truth.splits[s].targets and task.data.splits[s].soft is None


def test_scoring():
    digit = Task.load(TaskSpec("p", "digits", "Odd or even? {labels}", 0.5, {"answer": "parity"}), 56)
    assert digit.question == "Odd or even? even or odd" and digit.answer_text(1) == "odd"
    assert digit.score(" odd", 1) == (True, None) and digit.score("odd.", 1) == (False, None)
    assert digit.score(HeadOutput("p", "even"), 0) == (True, None)
    box = Task.load(TaskSpec("b", "locate", "Where?", 0.5, {"train": 2, "val": 2, "test": 2}), 56)
    target = [0.1, 0.1, 0.5, 0.5]
    assert box.score("(10,10),(50,50)", target) == (True, pytest.approx(1.0))
    assert box.score("no idea", target) == (False, 0.0)
    assert box.score(HeadOutput("b", "", box=[0.3, 0.3, 0.7, 0.7]), target)[0] is False
