"""`load_image`: what a client may send as an image, and the one-line refusal of what it may not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from valora.config import MultiModalConfig
from valora.multimodal.inputs import InputError, load_image


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("data", [b"", b"hello, not a png", b"<svg xmlns='http://www.w3.org/2000/svg'/>"],
                         ids=["empty", "text", "svg"])
def test_data_in_no_image_format_is_refused_in_words_a_client_can_use(data):
    with pytest.raises(InputError, match="no image format Pillow reads") as e:
        load_image(data, MultiModalConfig())
    assert "BytesIO" not in str(e.value) and " at 0x" not in str(e.value)


@pytest.mark.parametrize("img, fmt", [
    (Image.new("CMYK", (16, 8), (10, 20, 30, 40)), "JPEG"),
    (Image.fromarray(np.arange(128, dtype=np.uint16).reshape(8, 16) * 500), "PNG"),
    (Image.new("LA", (16, 8), (90, 0)), "PNG"),
    (Image.new("P", (16, 8), 3), "GIF"),
], ids=["cmyk-jpeg", "16-bit-png", "transparent-grey-png", "palette-gif"])
def test_other_modes_arrive_as_rgb(img, fmt):
    out = load_image(encoded(img, fmt), MultiModalConfig())
    assert out.mode == "RGB" and out.size == (16, 8)


def test_transparency_is_composited_onto_white():
    """As the HF image processors do: a fully transparent pixel is white, whatever colour it stores."""
    out = load_image(encoded(Image.new("LA", (16, 8), (90, 0)), "PNG"), MultiModalConfig())
    assert out.getpixel((0, 0)) == (255, 255, 255)
