"""OpenAI-style chat messages -> what the chat template needs, plus the images in order of appearance.

Image parts may carry a PIL image, bytes, a `data:` URL, a local file under an explicitly allowed folder, or an
http(s) URL on an explicitly allowed host (`MediaSources`); with neither allowed, only `data:` URLs are read and
the server makes no outbound fetches.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from valora.config import MultiModalConfig
from valora.multimodal.fetch import RemoteMedia
from valora.multimodal.inputs import InputError, MediaError
from valora.paths import check_path

_IMAGE_TYPES = ("image", "image_url", "image_pil", "input_image")


def image_data_url(image) -> str:
    """A PIL image as the PNG `data:` URL that `MediaSources.resolve` reads back (what OpenAI clients send)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class MediaSources:
    """Where media URLs may point besides `data:`: local files under `local_root`, http(s) hosts through
    `remote` (None: refused)."""

    local_root: str | Path | None = None
    remote: RemoteMedia | None = None

    @classmethod
    def from_config(cls, limits: MultiModalConfig, local_root: str | Path | None = None) -> MediaSources:
        remote = None
        if limits.allowed_media_domains:
            remote = RemoteMedia(limits.allowed_media_domains, limits.media_fetch_timeout_s)
        return cls(local_root, remote)

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    def resolve(self, url: str, max_bytes: int) -> bytes | Path:
        """The encoded bytes behind `url` (or the local file's path), at most `max_bytes` when fetched."""
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
            if self.remote is None:
                raise InputError("remote image URLs are not fetched; send the image as a data: URL (or start the "
                                 "server with --allowed-media-domains)")
            return self.remote.fetch(url, max_bytes)
        if parsed.scheme in ("file", ""):
            return self._local(url, parsed)
        raise InputError(f"unsupported image URL scheme {parsed.scheme!r}")

    def _local(self, url: str, parsed) -> Path:
        if self.local_root is None:
            raise InputError("local image files are disabled; start the server with --allowed-local-media-path")
        root = Path(self.local_root).resolve()
        try:
            path = Path(check_path(unquote(parsed.path if parsed.scheme == "file" else url), "image path")).resolve()
        except ValueError as e:
            raise InputError(str(e)) from e
        if not path.is_relative_to(root):
            raise InputError(f"image path is outside the allowed media folder {root}")
        if not path.is_file():
            raise InputError(f"image file not found: {path}")
        return path


def _image_of(part: dict, sources: MediaSources, max_bytes: int) -> Any:
    kind = part.get("type")
    value = part.get(kind) if kind in part else part.get("image", part.get("image_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if isinstance(value, str):
        return sources.resolve(value, max_bytes)
    if value is None:
        raise InputError(f"{kind} content part has no image")
    return value


def parse_messages(messages: list[dict], sources: MediaSources,
                   limits: MultiModalConfig | None = None) -> tuple[list[dict], list[Any]]:
    limits = limits or MultiModalConfig()
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
                try:
                    images.append(_image_of(part, sources, limits.max_image_bytes))
                except InputError as e:
                    raise MediaError("image", str(e)) from e
                parts.append({"type": "image"})
            elif part["type"] in ("text", "input_text"):
                if not isinstance(part.get("text", ""), str):
                    raise InputError("a text content part's 'text' must be a string")
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise InputError(f"unsupported content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out, images
