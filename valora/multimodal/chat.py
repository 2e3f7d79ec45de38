"""OpenAI-style chat messages -> what the chat template needs, plus the images and videos in order of appearance.

Image and video parts (`image_url`, `video_url`, ...) may carry a PIL image or frames, bytes, a `data:` URL, a local
file under an explicitly allowed folder, or an http(s) URL on an explicitly allowed host (`MediaSources`); with
neither allowed, only `data:` URLs are read and the server makes no outbound fetches. `chat_media` also decodes
the videos, and gives a model without a video placeholder (LLaVA) each video as its frames, image parts where the
video stood.
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
from valora.multimodal.video import Video, load_video, video_sampling
from valora.paths import check_path

_IMAGE_TYPES = ("image", "image_url", "image_pil", "input_image")
_VIDEO_TYPES = ("video", "video_url", "input_video")


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

    def resolve(self, url: str, max_bytes: int, what: str = "image") -> bytes | Path:
        """The encoded bytes behind `url` (or the local file's path), at most `max_bytes` when fetched; `what` (an
        image or a video) names it in errors."""
        if url.startswith("data:"):
            header, sep, payload = url.partition(",")
            if not sep or ";base64" not in header:
                raise InputError(f"{what} data URL must look like data:{what}/<type>;base64,<data>")
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, ValueError) as e:
                raise InputError(f"{what} data URL is not valid base64 ({e})") from e
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            if self.remote is None:
                raise InputError(f"remote {what} URLs are not fetched; send the {what} as a data: URL (or start the "
                                 "server with --allowed-media-domains)")
            return self.remote.fetch(url, max_bytes)
        if parsed.scheme in ("file", ""):
            return self._local(url, parsed, what)
        raise InputError(f"unsupported {what} URL scheme {parsed.scheme!r}")

    def _local(self, url: str, parsed, what: str) -> Path:
        if self.local_root is None:
            raise InputError(f"local {what} files are disabled; start the server with --allowed-local-media-path")
        root = Path(self.local_root).resolve()
        try:
            path = Path(check_path(unquote(parsed.path if parsed.scheme == "file" else url), f"{what} path")).resolve()
        except ValueError as e:
            raise InputError(str(e)) from e
        if not path.is_relative_to(root):
            raise InputError(f"{what} path is outside the allowed media folder {root}")
        if not path.is_file():
            raise InputError(f"{what} file not found: {path}")
        return path


def _media_of(part: dict, what: str, sources: MediaSources, max_bytes: int) -> Any:
    kind = part.get("type")
    value = part.get(kind) if kind in part else part.get(what, part.get(f"{what}_url"))
    if isinstance(value, dict):
        value = value.get("url")
    if isinstance(value, str):
        return sources.resolve(value, max_bytes, what)
    if value is None:
        raise InputError(f"{kind} content part has no {what}")
    return value


def parse_messages(messages: list[dict], sources: MediaSources,
                   limits: MultiModalConfig | None = None) -> tuple[list[dict], list[Any], list[Any]]:
    """(messages for the chat template, images, videos): media parts become `{"type": "image"}` and
    `{"type": "video"}` parts, and their contents (bytes, paths or objects, undecoded) come out in order."""
    limits = limits or MultiModalConfig()
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    out, media = [], {"image": [], "video": []}
    caps = {"image": limits.max_image_bytes, "video": limits.max_video_bytes}
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
            what = "image" if part["type"] in _IMAGE_TYPES else "video" if part["type"] in _VIDEO_TYPES else None
            if what is not None:
                try:
                    media[what].append(_media_of(part, what, sources, caps[what]))
                except InputError as e:
                    raise MediaError(what, str(e)) from e
                parts.append({"type": what})
            elif part["type"] in ("text", "input_text"):
                if not isinstance(part.get("text", ""), str):
                    raise InputError("a text content part's 'text' must be a string")
                parts.append({"type": "text", "text": part.get("text", "")})
            else:
                raise InputError(f"unsupported content part type {part['type']!r}")
        out.append({"role": m["role"], "content": parts})
    return out, media["image"], media["video"]


def chat_media(messages: list[dict], images: list, videos: list, limits: MultiModalConfig,
               media_io_kwargs: Any = None, frames_as_images: bool = False) -> tuple[list[dict], list, list[Video]]:
    """`parse_messages`' output with the videos decoded (sampled by the request's `media_io_kwargs`, else the
    configured defaults); with `frames_as_images` (a model without a video placeholder) every video part becomes
    one image part per frame and its frames join the images where it stood."""
    if len(videos) > limits.max_videos_per_prompt:
        raise MediaError("video", f"{len(videos)} videos in one request, over the limit of "
                                  f"{limits.max_videos_per_prompt}")
    try:
        sampling = video_sampling(limits, media_io_kwargs)
        decoded = [load_video(v, limits, sampling) for v in videos]
    except InputError as e:
        raise MediaError("video", str(e)) from e
    if not frames_as_images or not decoded:
        return messages, images, decoded
    images, videos_left, out_images, out = list(images), list(decoded), [], []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(m)
            continue
        parts = []
        for part in m["content"]:
            if part["type"] == "video":
                frames = videos_left.pop(0).frames
                parts += [{"type": "image"}] * len(frames)
                out_images += frames
            else:
                if part["type"] == "image":
                    out_images.append(images.pop(0))
                parts.append(part)
        out.append({"role": m["role"], "content": parts})
    if len(out_images) > limits.max_images_per_prompt:
        raise MediaError("video", f"{len(out_images)} images with the videos' frames, over the limit of "
                                  f"{limits.max_images_per_prompt} (this model takes a video's frames as images; ask "
                                  "for fewer with media_io_kwargs' num_frames)")
    return out, out_images, []
