"""Each family's image tensors next to the checkpoint's Hugging Face image processor (its PIL backend, what
transformers runs without torchvision): equal to the bit over sizes, aspect ratios, image modes and processor
settings, the tiny test checkpoints' and checkpoint-sized ones."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from valora.config import MultiModalConfig
from valora.models.registry import resolve_family
from valora.multimodal.inputs import load_image
from valora.multimodal.pixels import hf_tensors
from valora.testing.families import FAMILIES
from valora.testing.images import random_image

# Image processor settings per family: the tiny checkpoints' own (None), and those of real checkpoints (a smaller
# Qwen max_pixels than Qwen2-VL-7B's 12845056 keeps the reference's float64 path quick), LLaVA's padding to a
# square, and a crop larger than the resized image (HF pads it).
SETTINGS = {
    "qwen2_vl": [None, ("Qwen2VLImageProcessorPil", {"min_pixels": 3136, "max_pixels": 602112})],
    "qwen2_5_vl": [None],
    "llava": [None, ("CLIPImageProcessorPil", {"size": {"shortest_edge": 336},
                                               "crop_size": {"height": 336, "width": 336}}),
              ("LlavaImageProcessorPil", {"do_pad": True, "size": {"shortest_edge": 48},
                                          "crop_size": {"height": 48, "width": 48}}),
              ("CLIPImageProcessorPil", {"size": {"height": 40, "width": 30}, "crop_size": {"height": 36,
                                                                                           "width": 44}})],
    "internvl": [None, ("GotOcr2ImageProcessorPil", {"size": {"height": 448, "width": 448}, "max_patches": 12})],
}
CASES = [(name, setting) for name, settings in SETTINGS.items() for setting in settings]
# What each family's HF processor passes its image processor on top of the settings.
CALL_KWARGS = {"internvl": {"crop_to_patches": True}}

SIZES = [(4, 4), (5, 7), (28, 28), (56, 84), (333, 517), (448, 448), (900, 1300), (8, 1500), (1400, 9)]


def _rgba(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")


def _palette_with_transparency(h: int, w: int, seed: int) -> Image.Image:
    image = random_image(h, w, seed).convert("P")
    image.info["transparency"] = 3
    return image


MODES = {
    "RGB": random_image,
    "RGBA": _rgba,
    "L": lambda h, w, seed: random_image(h, w, seed).convert("L"),
    "LA": lambda h, w, seed: _rgba(h, w, seed).convert("LA"),
    "P": _palette_with_transparency,
}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{c[1][0] if c[1] else 'tiny'}")
def case(request, model_factory, tmp_path_factory):
    """(family, ours, transformers') for one setting of a family's image processor."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    name, setting = request.param
    model_dir = model_factory(name, initializer_range=0.05)
    if setting is not None:
        tiny, (cls, kwargs) = model_dir, setting
        model_dir = tmp_path_factory.mktemp("processor") / "model"
        shutil.copytree(tiny, model_dir)
        getattr(transformers, cls)(**kwargs).save_pretrained(model_dir)
    hf_config = AutoConfig.from_pretrained(model_dir)
    ours = resolve_family(hf_config).processor_cls(model_dir, hf_config, AutoTokenizer.from_pretrained(model_dir))
    return FAMILIES[name], ours, transformers.AutoImageProcessor.from_pretrained(model_dir, backend="pil")


def _assert_same(family, ours, reference, image: Image.Image) -> None:
    expected = reference(images=[image], return_tensors="pt", **CALL_KWARGS.get(family.name, {}))
    got = ours.image_tensors(load_image(image, MultiModalConfig()))
    assert got["pixel_values"].dtype == torch.uint8  # the model's device looks its values up (`upload_pixels`)
    assert torch.equal(hf_tensors(got)["pixel_values"], expected["pixel_values"])
    if "image_grid_thw" in expected:
        assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"])


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_image_tensors_equal_the_hf_processor(case, size):
    _assert_same(*case, random_image(*size, seed=size[0] * 7 + size[1]))


@pytest.mark.parametrize("mode", list(MODES))
def test_every_image_mode_converts_as_the_hf_processor_does(case, mode):
    """Transparency lands on white, as HF's convert_to_rgb composites it (not on the colour hidden under it)."""
    _assert_same(*case, MODES[mode](37, 61, seed=len(mode)))


def test_content_hash_follows_the_pixels(case):
    """Equal pixels hash equal whatever object carries them; changed pixels the model sees change the hash (a
    crop's margins, which it does not see, need not: the hash is of the resized, cropped pixels)."""
    family, ours, _ = case
    image = random_image(40, 52, seed=1)
    prompt = f"{family.image_prompt} hi"
    first = ours(prompt, [load_image(image, MultiModalConfig())]).images[0].content_hash
    assert ours(prompt, [load_image(image.copy(), MultiModalConfig())]).images[0].content_hash == first
    changed = image.copy()
    for x in range(18, 22):
        for y in range(24, 28):  # a block at the centre, inverted: it survives any resize to whole pixels
            changed.putpixel((x, y), tuple(255 - v for v in changed.getpixel((x, y))))
    assert ours(prompt, [load_image(changed, MultiModalConfig())]).images[0].content_hash != first
    assert ours(prompt, [load_image(image.resize((80, 104)), MultiModalConfig())]).images[0].content_hash != first
