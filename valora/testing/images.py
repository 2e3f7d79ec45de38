"""Deterministic test images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def random_image(h: int, w: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
