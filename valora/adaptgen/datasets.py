"""The embedded task datasets, generated deterministically from the pip-packaged images of `sources.py`.

Every generator returns a train / validation / held-out triple of `Examples` built only from the matching split of
its source (a canvas of held-out digits holds only held-out digits), so the split rule carries over to every task.
Targets are class indices into `TaskData.labels`, or boxes [x1, y1, x2, y2] as fractions of the image size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from valora.adaptgen.sources import DIGIT_SOURCES, DigitSource, column_ranges, picture

SPLITS = ("train", "val", "test")
VERSION = 1  # bump when a generator changes what it generates: cached trainings then no longer apply
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
ROTATIONS = ("upright", "turned left", "upside down", "turned right")  # np.rot90 k = 0..3 (counter-clockwise)


@dataclass
class Examples:
    images: list[Image.Image]
    targets: list  # class index, or box [x1, y1, x2, y2]
    soft: np.ndarray | None = None  # [N, C] a teacher's class probabilities, when a teacher labelled them

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class TaskData:
    labels: tuple[str, ...] | None  # class names; None for box targets
    splits: dict[str, Examples] = field(default_factory=dict)

    @property
    def is_box(self) -> bool:
        return self.labels is None


def _rgb(gray: np.ndarray, size: int) -> Image.Image:
    img = Image.fromarray(gray, mode="L")
    return (img if img.size == (size, size) else img.resize((size, size), Image.BILINEAR)).convert("RGB")


def _glyph(gray: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(gray, mode="L").resize((side, side), Image.BILINEAR))


def digits(size: int, seed: int, source: str = "sklearn", answer: str = "numeral") -> TaskData:
    """Name the digit (`numeral` "7", `word` "seven") or say whether it is `parity` "odd" or "even"."""
    src = _source(source)
    names = {"numeral": tuple(map(str, range(10))), "word": NUMBER_WORDS, "parity": ("even", "odd")}[answer]
    of = (lambda d: d % 2) if answer == "parity" else (lambda d: d)
    return TaskData(names, {s: Examples([_rgb(src.images[i], size) for i in src.split[s]],
                                        [int(of(src.labels[i])) for i in src.split[s]]) for s in SPLITS})


def rotation(size: int, seed: int, source: str = "sklearn", digits: tuple[int, ...] = (2, 3, 4, 5, 7)) -> TaskData:
    """How the digit is turned; every image in all four orientations. The default digits have no rotational
    symmetry (a 6 upside down is a 9, an 8 or 0 looks the same), so every answer is well defined."""
    src = _source(source)
    data = TaskData(ROTATIONS)
    for s in SPLITS:
        idx = [i for i in src.split[s] if src.labels[i] in digits]
        data.splits[s] = Examples([_rgb(np.rot90(src.images[i], k), size) for i in idx for k in range(4)],
                                  [k for _ in idx for k in range(4)])
    return data


def _sizes(train: int, val: int, test: int) -> dict[str, int]:
    return {"train": train, "val": val, "test": test}


def count(size: int, seed: int, source: str = "sklearn", max_count: int = 4, grid: int = 4,
          train: int = 2000, val: int = 200, test: int = 400) -> TaskData:
    """How many digits are on the canvas: 1..max_count digits in distinct cells of a grid x grid layout."""
    src, cell = _source(source), size // grid
    data = TaskData(tuple(str(n) for n in range(1, max_count + 1)))
    for split_id, (s, n) in enumerate(_sizes(train, val, test).items()):
        rng = np.random.default_rng([seed, split_id])
        pool = src.split[s]
        images, targets = [], []
        for _ in range(n):
            k = int(rng.integers(1, max_count + 1))
            canvas = np.zeros((size, size), np.uint8)
            for c, i in zip(rng.choice(grid * grid, k, replace=False), rng.choice(pool, k)):
                y, x = divmod(int(c), grid)
                canvas[y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = _glyph(src.images[i], cell)
            images.append(_rgb(canvas, size))
            targets.append(k - 1)
        data.splits[s] = Examples(images, targets)
    return data


def compare(size: int, seed: int, source: str = "mnist", train: int = 2000, val: int = 200,
            test: int = 400) -> TaskData:
    """Which of two different digits side by side is larger."""
    src, half = _source(source), size // 2
    data = TaskData(("left", "right"))
    for split_id, (s, n) in enumerate(_sizes(train, val, test).items()):
        rng = np.random.default_rng([seed, split_id])
        pool = src.split[s]
        images, targets = [], []
        while len(images) < n:
            a, b = (int(i) for i in rng.choice(pool, 2))
            if src.labels[a] == src.labels[b]:
                continue
            canvas = np.zeros((size, size), np.uint8)
            canvas[:half, :half] = _glyph(src.images[a], half)
            canvas[:half, half : 2 * half] = _glyph(src.images[b], half)
            images.append(_rgb(canvas, size))
            targets.append(int(src.labels[b] > src.labels[a]))
        data.splits[s] = Examples(images, targets)
    return data


def locate(size: int, seed: int, source: str = "mnist", min_scale: float = 0.35, max_scale: float = 0.6,
           train: int = 2000, val: int = 200, test: int = 400) -> TaskData:
    """Where the digit is: one digit, scaled and placed at random; the target is its ink's bounding box."""
    src = _source(source)
    data = TaskData(None)
    for split_id, (s, n) in enumerate(_sizes(train, val, test).items()):
        rng = np.random.default_rng([seed, split_id])
        images, targets = [], []
        for i in rng.choice(src.split[s], n):
            side = int(round(size * rng.uniform(min_scale, max_scale)))
            x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
            canvas = np.zeros((size, size), np.uint8)
            canvas[y : y + side, x : x + side] = _glyph(src.images[i], side)
            ys, xs = np.nonzero(canvas > 64)
            images.append(_rgb(canvas, size))
            targets.append([float(xs.min()) / size, float(ys.min()) / size, float(xs.max() + 1) / size,
                            float(ys.max() + 1) / size])
        data.splits[s] = Examples(images, targets)
    return data


def scenes(size: int, seed: int, pictures: dict[str, str] | None = None, train: int = 2000, val: int = 200,
           test: int = 400) -> TaskData:
    """Which picture a crop comes from; crops of `size` pixels from the split's column range of each picture."""
    pictures = pictures or {"brick": "brick", "grass": "grass", "gravel": "gravel", "moon": "moon",
                            "stars": "hubble_deep_field", "cells": "immunohistochemistry"}
    data = TaskData(tuple(pictures))
    for split_id, (s, n) in enumerate(_sizes(train, val, test).items()):
        rng = np.random.default_rng([seed, split_id])
        images, targets = [], []
        for _ in range(n):
            c = int(rng.integers(len(pictures)))
            img = picture(list(pictures.values())[c])
            lo, hi = column_ranges(img.shape[1])[s]
            if hi - lo < size or img.shape[0] < size:
                raise ValueError(f"picture {list(pictures.values())[c]!r} is too small for {size}-pixel crops")
            x, y = int(rng.integers(lo, hi - size + 1)), int(rng.integers(0, img.shape[0] - size + 1))
            images.append(Image.fromarray(img[y : y + size, x : x + size]))
            targets.append(c)
        data.splits[s] = Examples(images, targets)
    return data


def _source(name: str) -> DigitSource:
    if name not in DIGIT_SOURCES:
        raise ValueError(f"unknown digit source {name!r}; choose one of {', '.join(DIGIT_SOURCES)}")
    return DIGIT_SOURCES[name]()


GENERATORS: dict[str, Callable[..., TaskData]] = {
    "digits": digits, "rotation": rotation, "count": count, "compare": compare, "locate": locate, "scenes": scenes,
}


def generate(kind: str, size: int, seed: int, options: dict[str, Any]) -> TaskData:
    if kind not in GENERATORS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(GENERATORS)}")
    try:
        return GENERATORS[kind](size, seed, **options)
    except TypeError as e:
        raise ValueError(f"dataset {kind!r}: {e}") from e
