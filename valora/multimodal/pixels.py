"""Pixel operations the families' image preprocessing shares, bit-identical to the PIL backend of the Hugging Face
image processors (what transformers runs without torchvision, and the reference the parity tests compare with).

- `to_rgb`: transparency composited onto white, as HF's `convert_to_rgb` does (a plain `convert("RGB")` would
  keep whatever colour hides under a transparent pixel).
- `resize`: PIL's own resize, which is what HF's PIL path calls too (it converts to a PIL image to resize); it is C
  and releases the GIL, so a thread pool scales with it.
- `PixelNormalizer`: rescale and normalise as one table lookup. A pixel is one of 256 uint8 values per channel, so
  HF's arithmetic (uint8 -> float64 times the rescale factor, rounded to float32, then float32 (x - mean) / std)
  runs once per value when the processor is built, and every image afterwards is a single gather whose outputs are
  those float32 values bit for bit. The gather runs where the model is (`lookup`, from models/layers/uploads.py):
  an item leaves the front end as uint8 pixels in the model's layout with its table beside them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize(image: Image.Image, height: int, width: int, resample: int) -> Image.Image:
    return image.resize((width, height), resample=resample)


def pad_to_square(image: Image.Image, color: tuple[int, ...]) -> Image.Image:
    """The image centred on a square of `color` as wide as its longer side (LLaVA's `do_pad`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def center_crop(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre `height` x `width` of [H, W, C] pixels; a side shorter than the crop is first padded with zeros
    on both ends (the extra pixel after), as HF's `center_crop` does."""
    h, w = pixels.shape[:2]
    if h < height or w < width:
        nh, nw = max(h, height), max(w, width)
        canvas = pixels.new_zeros(nh, nw, pixels.shape[2])
        top, left = -(-(nh - h) // 2), -(-(nw - w) // 2)
        canvas[top : top + h, left : left + w] = pixels
        pixels, h, w = canvas, nh, nw
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def as_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a [H, W, 3] uint8 tensor (one copy, which the tensor owns)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


PIXEL_TABLE = "pixel_table"  # an item's key for its pixels' table (`PixelNormalizer.tensors`)


@dataclass(frozen=True)
class PixelNormalizer:
    table: torch.Tensor  # [3, 256] float32: the processed value of uint8 value v of channel c at [c, v]

    @classmethod
    def build(cls, do_rescale: bool, rescale_factor: float, do_normalize: bool, mean, std) -> PixelNormalizer:
        values = np.arange(256, dtype=np.uint8)
        x = (values.astype(np.float64) * rescale_factor).astype(np.float32) if do_rescale \
            else values.astype(np.float32)
        x = np.broadcast_to(x, (3, 256))
        if do_normalize:
            x = (x - np.array(_per_channel(mean), dtype=np.float32)[:, None]) / \
                np.array(_per_channel(std), dtype=np.float32)[:, None]
        return cls(torch.from_numpy(np.ascontiguousarray(x)))

    @classmethod
    def from_hf(cls, processor) -> PixelNormalizer:
        """The table for an HF image processor's `do_rescale`, `rescale_factor`, `do_normalize`, mean and std."""
        return cls.build(processor.do_rescale, processor.rescale_factor, processor.do_normalize, processor.image_mean,
                         processor.image_std)

    def tensors(self, key: str, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """An item's tensors: uint8 `pixels` in the model's layout ([n, 3, ...] or [n, 3 * k], channel first in
        each row) under `key`, and this table, which the model applies on its own device (`lookup`): a quarter of
        float32's bytes cross to the engine core and the bus, and the front end skips the float pass."""
        return {key: pixels.contiguous(), PIXEL_TABLE: self.table}


def lookup(pixels: torch.Tensor, tables: torch.Tensor, which: torch.Tensor | None = None) -> torch.Tensor:
    """float32 values of uint8 `pixels` ([n, ...], each row channel first: it views as [n, 3, -1]) from `tables`
    ([t, 3, 256], on the pixels' device); row i reads table `which[i]` (default: the first for all). The values are
    HF's own arithmetic, done once per byte value when the table was built: the same float32 values, bit for bit."""
    n = pixels.shape[0]
    base = torch.arange(0, 3 * 256, 256, dtype=torch.int32, device=pixels.device).view(1, 3, 1)
    if which is not None:
        base = base + which.to(torch.int32).view(n, 1, 1) * (3 * 256)
    index = pixels.reshape(n, 3, -1).to(torch.int32).add_(base)
    return tables.reshape(-1).index_select(0, index.view(-1)).view(pixels.shape)


def hf_tensors(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An item's tensors as the HF processor gives them: its uint8 pixels as float32 through its table, which is
    left out."""
    table = data.get(PIXEL_TABLE)
    return {k: lookup(v, table[None]) if table is not None and v.dtype == torch.uint8 else v
            for k, v in data.items() if k != PIXEL_TABLE}


def _per_channel(v) -> list[float]:
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * 3


def content_hash(key: bytes, pixels: torch.Tensor) -> str:
    """Identity of a processed item: the uint8 pixels its tensors are made of (after resizing, padding, cropping,
    tiling: exactly what the model sees, so two items that hash alike give the same embeddings), their shape, and
    `key`, the processing parameters that turn them into tensors. The tensor's own buffer is hashed, without a copy;
    hashing the decoded image instead read every pixel of a large photo (a 12-megapixel one is 36 MB, about 20 ms of
    SHA-256) where the model takes 448x448, and copied it first (`Image.tobytes`). SHA-256 (the first 16 bytes),
    which CPUs with SHA extensions (x86 since Zen and Ice Lake, ARMv8) run about three times as fast as BLAKE2b."""
    h = hashlib.sha256(key)
    h.update(repr(tuple(pixels.shape)).encode())
    h.update(pixels.contiguous().numpy())
    return h.hexdigest()[:32]
