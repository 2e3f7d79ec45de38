"""OpenAI-style chat messages -> what the chat template needs, plus the images in order of appearance.

Image parts may carry a PIL image, bytes, a `data:` URL, or a local file under an explicitly allowed folder.
Remote URLs are refused: the server never makes outbound fetches.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from valora.multimodal.inputs import InputError
from valora.paths import check_path

_IMAGE_TYPES = ("image", "image_url", "image_pil", "input_image")


def image_data_url(image) -> str:
    """A PIL image as the PNG `data:` URL that `decode_image_url` reads back (what OpenAI clients send)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def decode_image_url(url: str, allowed_local_path: str | Path | None = None) -> bytes | Path:
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise InputError("image data URL must look like data:image/<type>;base64,<data>")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InputError(f"image data URL is not valid base64 ({e})") from e
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https"):
        raise InputError("remote image URLs are not fetched; send the image as a data: URL")
    if parsed.scheme in ("file", ""):
        if allowed_local_path is None:
            raise InputError("local image files are disabled; start the server with --allowed-local-media-path")
        root = Path(allowed_local_path).resolve()
        try:
            path = Path(check_path(unquote(parsed.path if parsed.scheme == "file" else url), "image path")).resolve()
        except ValueError as e:
            raise InputError(str(e)) from e
        if not path.is_relative_to(root):
            raise InputError(f"image path is outside the allowed media folder {root}")
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        return path
    raise InputError(f"unsupported image URL scheme {parsed.scheme!r}")


def _image_of(part: dict, allowed_local_path) -> Any:
    kind = part.get("type")
    value = part.get(kind) if kind in part else part.get("image", part.get("image_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if isinstance(value, str):
        return decode_image_url(value, allowed_local_path)
    if value is None:
        raise InputError(f"{kind} content part has no image")
    return value


def parse_messages(messages: list[dict], allowed_local_path: str | Path | None = None) -> tuple[list[dict], list[Any]]:
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    out, images = [], []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InputError("each message needs a 'role' string")
        content = m.get("content")
        if content is None or isinstance(content, str):
            out.append({"role": m["role"], "content": content or ""})
            continue
        if not isinstance(content, list):
            raise InputError("message content must be a string or a list of parts")
        parts = []
        for part in content:
            if not isinstance(part, dict) or "type" not in part:
                raise InputError("each content part needs a 'type'")
            if part["type"] in _IMAGE_TYPES:
                images.append(_image_of(part, allowed_local_path))
                parts.append({"type": "image"})
            elif part["type"] in ("text", "input_text"):
                if not isinstance(part.get("text", ""), str):
                    raise InputError("a text content part's 'text' must be a string")
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise InputError(f"unsupported content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out, images
