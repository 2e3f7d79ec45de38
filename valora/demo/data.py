"""Real handwritten digits that ship inside scikit-learn (`load_digits`: 1,797 8x8 scans), as RGB images.

The images are upscaled so that Qwen2-VL's 14-pixel patches see them at a useful size: 56x56 is 4x4 patches,
which the 2x2 patch merger turns into 4 image tokens per digit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class DigitSet:
    images: list[Image.Image]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices) -> DigitSet:
        return DigitSet([self.images[i] for i in indices], [self.labels[i] for i in indices])


def load_digits(size: int = 56) -> DigitSet:
    """All 1,797 digits, white on black as scanned, upscaled to `size` x `size` RGB."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    pixels = (raw.images * (255.0 / 16.0)).round().astype(np.uint8)
    images = [Image.fromarray(p, mode="L").resize((size, size), Image.BILINEAR).convert("RGB") for p in pixels]
    return DigitSet(images, [int(y) for y in raw.target])


def split(data: DigitSet, test_fraction: float, seed: int) -> tuple[DigitSet, DigitSet]:
    """A stratified train / held-out split, so every digit is equally represented in both."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(data.labels)
    train, test = [], []
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        cut = int(round(len(idx) * test_fraction))
        test.extend(idx[:cut].tolist())
        train.extend(idx[cut:].tolist())
    return data.subset(sorted(train)), data.subset(sorted(test))
