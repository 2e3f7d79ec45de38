"""Prompt inputs after preprocessing: token ids with expanded image placeholders, and the images' tensors."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from valora.config import MultiModalConfig
from valora.errors import UserError
from valora.multimodal.pixels import to_rgb


class InputError(UserError):
    """A request that cannot be served as given; the message names the problem. `code` and `param` (OpenAI's
    error fields) say what kind of problem and which request field, where the raiser knows better than the
    caller's default."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


class MediaError(InputError):
    """An image or video of the request that cannot be read or fetched (`kind` says which)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, f"invalid_{kind}", "messages")
        self.kind = kind


# Geometry every family's processor takes: Qwen2-VL's `smart_resize` refuses an aspect ratio over 200, and sides of
# 1 or 3 pixels make the HF image processors guess the channel axis wrongly. Checked before any processor runs.
MIN_IMAGE_SIDE = 4
MAX_IMAGE_ASPECT_RATIO = 200


@dataclass
class ImageItem:
    data: dict[str, torch.Tensor]  # the HF model's tensors for this one image (or frame, or Qwen2-VL video)
    num_tokens: int  # placeholder tokens it fills in the prompt
    offset: int  # index of its first placeholder token in the prompt
    content_hash: str


@dataclass
class ProcessedPrompt:
    token_ids: list[int]
    images: list[ImageItem] = field(default_factory=list)  # in prompt order (increasing offsets)
    positions: torch.Tensor | None = None  # [3, L] M-RoPE positions of the prompt; None = 0..L-1
    position_delta: int = 0  # a token at index i >= L sits at position i + delta


def lone_surrogate(text: str) -> int | None:
    """Where `text` has a lone UTF-16 surrogate (None: it is Unicode text, which a tokenizer can encode). Python
    strings may hold one (a JSON `\\ud800` escape, `surrogatepass` decoding); no tokenizer takes it."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as e:
        return e.start
    return None


def load_image(obj: Any, limits: MultiModalConfig) -> Image.Image:
    """Accept a PIL image, raw bytes or a local path; refuse what cannot be decoded or is over the limits. The
    result is RGB, transparency composited onto white as the HF image processors do."""
    try:
        if isinstance(obj, Image.Image):
            img = obj
        elif isinstance(obj, (bytes, bytearray)):
            if len(obj) > limits.max_image_bytes:
                raise InputError(f"image is {len(obj)} bytes, over the limit of {limits.max_image_bytes}")
            img = Image.open(io.BytesIO(obj))
        elif isinstance(obj, (str, Path)):
            size = os.stat(obj).st_size
            if size > limits.max_image_bytes:
                raise InputError(f"image file is {size} bytes, over the limit of {limits.max_image_bytes}")
            img = Image.open(obj)
        else:
            raise InputError(f"unsupported image type {type(obj).__name__}; pass a PIL image, bytes or a path")
        w, h = img.size
        if w * h > limits.max_image_pixels:
            raise InputError(f"image is {w}x{h} pixels, over the limit of {limits.max_image_pixels}")
        if min(w, h) < MIN_IMAGE_SIDE:
            raise InputError(f"image is {w}x{h} pixels; each side must be at least {MIN_IMAGE_SIDE}")
        if max(w, h) > MAX_IMAGE_ASPECT_RATIO * min(w, h):
            raise InputError(f"image is {w}x{h} pixels; the longer side may be at most {MAX_IMAGE_ASPECT_RATIO} times "
                             "the shorter")
        img.load()
        return to_rgb(img)
    except InputError:
        raise
    except UnidentifiedImageError:  # Pillow's message names the buffer object, which says nothing to a client
        raise InputError("cannot read image: no image format Pillow reads (JPEG, PNG, WebP, GIF, BMP, TIFF, ...) "
                         "recognises the data") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image: {e}") from e
