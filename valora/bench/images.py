"""Real images for the workloads, from pictures that ship inside pip packages (no download at run time).

Photos come from scikit-image's bundled data and scikit-learn's sample images, digits from scikit-learn's 8x8
digits. A request's image is a crop of one picture resized to the size its task asks for, so image work on the
server (decoding, resizing, vision tokens) is that of real content. Frames of a "video" are crops panned across
one picture; a frame the workload repeats is the same `ImageRef`, hence byte-identical, so a server's image cache
would see it. A video request sends its frames as one MP4 clip at `VIDEO_FPS`.
"""

from __future__ import annotations

import base64
import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from valora.multimodal.video import video_data_url

# scikit-image pictures that are bundled with the wheel (`eagle` would need a download).
SKIMAGE_PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
                    "colorwheel", "camera", "coins", "moon", "clock", "page", "text", "horse", "brick", "grass",
                    "gravel", "logo", "checkerboard")
_PAN_STEPS = 16  # a video pans across its picture in this many frames, then starts again
_CROP = 0.75  # a frame shows this share of the picture's width and height
VIDEO_FPS = 2  # frames a second of a clip; a request asks the server to sample it at this rate, so it sees every frame


@dataclass(frozen=True, order=True)
class ImageRef:
    picture: int  # index into `pictures()`
    frame: int  # position in the picture's video (0 for a still image)
    size: tuple[int, int]  # (width, height) sent to the server


def _rgb(a: np.ndarray) -> np.ndarray:
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    return np.ascontiguousarray(a[..., :3].astype(np.uint8))


@functools.cache
def pictures() -> tuple[np.ndarray, ...]:
    """Every picture as RGB uint8, photos and digits interleaved (so the first k hold both kinds), then the rest
    of the digits."""
    import skimage.data
    from sklearn.datasets import load_digits, load_sample_images

    photos = [_rgb(getattr(skimage.data, name)()) for name in SKIMAGE_PICTURES]
    photos += [_rgb(a) for a in load_sample_images().images]
    digits = [_rgb((d * 255 / 16).astype(np.uint8)).repeat(8, axis=0).repeat(8, axis=1)
              for d in load_digits().images]
    mixed = [p for pair in zip(photos, digits) for p in pair]
    return tuple(mixed + digits[len(photos):])


def render(ref: ImageRef) -> Image.Image:
    pic = pictures()[ref.picture % len(pictures())]
    h, w = pic.shape[:2]
    ch, cw = max(1, int(h * _CROP)), max(1, int(w * _CROP))
    step = ref.frame % _PAN_STEPS
    x = (w - cw) * step // (_PAN_STEPS - 1)
    y = (h - ch) * step // (_PAN_STEPS - 1)
    crop = Image.fromarray(pic[y:y + ch, x:x + cw])
    return crop.resize(ref.size, Image.Resampling.BICUBIC)


@functools.lru_cache(maxsize=8192)
def data_url(ref: ImageRef) -> str:
    """The image as a `data:` URL (JPEG, quality 90), encoded once per distinct image."""
    buf = io.BytesIO()
    render(ref).save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@functools.lru_cache(maxsize=2048)
def video_url(frames: tuple[ImageRef, ...]) -> str:
    """The frames as a `data:video/mp4` URL (H.264 at `VIDEO_FPS`), encoded once per distinct clip."""
    return video_data_url([render(ref) for ref in frames], VIDEO_FPS)
