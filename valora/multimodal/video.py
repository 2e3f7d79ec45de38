"""Video input: a clip (encoded bytes, a local file, or frames already in hand) -> a `Video` of RGB frames sampled
in time, under the limits.

Decoding is PyAV's (FFmpeg; MP4, WebM and the rest of what FFmpeg reads). Frames are sampled uniformly in time:
`fps` frames per second of video, at most `num_frames` (vLLM's `media_io_kwargs` names), never fewer than one;
the frame kept for time t is the one showing at t. Decoding stops at the last frame needed. A clip longer than the
limit, too large in bytes or pixels, or that FFmpeg cannot read is an `InputError`.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from valora.config import MultiModalConfig
from valora.multimodal.inputs import MAX_IMAGE_ASPECT_RATIO, MIN_IMAGE_SIDE, InputError
from valora.multimodal.pixels import to_rgb

FPS_LIMIT = 240  # decoded frames per second of video at most (a stream claiming more is refused)


@dataclass(frozen=True)
class VideoSampling:
    fps: float = 2.0  # frames sampled per second of video
    num_frames: int = 32  # frames sampled at most

    def __post_init__(self) -> None:
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise InputError(f"video fps must be a positive number, got {self.fps!r}")
        if not isinstance(self.num_frames, int) or isinstance(self.num_frames, bool) or self.num_frames < 1:
            raise InputError(f"video num_frames must be a positive integer, got {self.num_frames!r}")

    def updated(self, kwargs: dict[str, Any] | None) -> VideoSampling:
        """These defaults with a request's `{"fps": ..., "num_frames": ...}` on top."""
        if not kwargs:
            return self
        if not isinstance(kwargs, dict) or set(kwargs) - {"fps", "num_frames"}:
            raise InputError("video sampling options are 'fps' and 'num_frames'")
        return VideoSampling(kwargs.get("fps", self.fps), kwargs.get("num_frames", self.num_frames))


def video_sampling(limits: MultiModalConfig, media_io_kwargs: Any = None) -> VideoSampling:
    """The sampling of a request's videos: the configured defaults (their frame count within the limit), under a
    request's vLLM-style `media_io_kwargs={"video": {"fps": ..., "num_frames": ...}}`."""
    if media_io_kwargs is not None and (not isinstance(media_io_kwargs, dict) or set(media_io_kwargs) - {"video"}):
        raise InputError('media_io_kwargs takes {"video": {"fps": ..., "num_frames": ...}}')
    defaults = VideoSampling(limits.video_fps, min(limits.video_num_frames, limits.max_video_frames))
    return defaults.updated((media_io_kwargs or {}).get("video"))


@dataclass
class Video:
    frames: list[Image.Image]  # RGB, in time order, all of one size
    fps: float  # frames per second of the sampled frames (Qwen2.5-VL scales its temporal positions by it)


def load_video(obj: Any, limits: MultiModalConfig, sampling: VideoSampling | None = None) -> Video:
    """Accept encoded bytes, a local path, a `Video`, or one clip's frames (PIL images or HxWx3 uint8 arrays, a
    list or a TxHxWx3 array, taken as already sampled at `sampling.fps`). `sampling` defaults to the limits'."""
    sampling = sampling or video_sampling(limits)
    if sampling.num_frames > limits.max_video_frames:
        raise InputError(f"{sampling.num_frames} video frames asked for, over the limit of {limits.max_video_frames}")
    if isinstance(obj, Video):
        return _checked(obj.frames, obj.fps, limits)
    if isinstance(obj, (bytes, bytearray)):
        if len(obj) > limits.max_video_bytes:
            raise InputError(f"video is {len(obj)} bytes, over the limit of {limits.max_video_bytes}")
        return _decode(io.BytesIO(obj), limits, sampling)
    if isinstance(obj, (str, Path)):
        try:
            size = os.stat(obj).st_size
        except OSError as e:
            raise InputError(f"cannot read video: {e}") from e
        if size > limits.max_video_bytes:
            raise InputError(f"video file is {size} bytes, over the limit of {limits.max_video_bytes}")
        return _decode(str(obj), limits, sampling)
    if isinstance(obj, (np.ndarray, list, tuple)):
        return _checked([_frame(f) for f in obj], sampling.fps, limits)
    raise InputError(f"unsupported video type {type(obj).__name__}; pass bytes, a path or a list of frames")


def as_videos(value: Any) -> list:
    """`multi_modal_data["video"]` as a list of videos: one video (bytes, a path, a `Video`, a TxHxWx3 array, or
    a list of frames) or a list of them."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        return [value]
    first = value[0] if value else None
    frames = isinstance(first, Image.Image) or (isinstance(first, np.ndarray) and first.ndim == 3)
    return [value] if frames else list(value)


def _frame(f: Any) -> Image.Image:
    if isinstance(f, Image.Image):
        return f
    a = np.asarray(f)
    if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8:
        raise InputError(f"a video frame must be an HxWx3 uint8 array or a PIL image, got {a.dtype} {a.shape}")
    return Image.fromarray(a)


def _checked(frames: Sequence[Image.Image], fps: float, limits: MultiModalConfig) -> Video:
    if not frames:
        raise InputError("video has no frames")
    if len(frames) > limits.max_video_frames:
        raise InputError(f"video has {len(frames)} frames, over the limit of {limits.max_video_frames}")
    sizes = {f.size for f in frames}
    if len(sizes) > 1:
        raise InputError(f"video frames differ in size: {sorted(sizes)}")
    _check_size(*frames[0].size, limits)
    return Video([to_rgb(f) for f in frames], float(fps))


def _check_size(w: int, h: int, limits: MultiModalConfig) -> None:
    if w * h > limits.max_image_pixels:
        raise InputError(f"video frames are {w}x{h} pixels, over the limit of {limits.max_image_pixels}")
    if min(w, h) < MIN_IMAGE_SIDE or max(w, h) > MAX_IMAGE_ASPECT_RATIO * min(w, h):
        raise InputError(f"video frames are {w}x{h} pixels; each side must be at least {MIN_IMAGE_SIDE} and at most "
                         f"{MAX_IMAGE_ASPECT_RATIO} times the other")


def sample_times(duration: float | None, sampling: VideoSampling, frames: int | None = None) -> list[float]:
    """The times (s) whose frames are kept: `fps` a second spread evenly over the clip, at most `num_frames` (and
    at most the clip's `frames`, when known); a clip of unknown length is sampled at `fps` from its start until
    `num_frames`."""
    if duration is None:
        return [k / sampling.fps for k in range(sampling.num_frames)]
    n = max(1, min(sampling.num_frames, frames or sampling.num_frames, math.floor(duration * sampling.fps + 1e-6)))
    return [k * duration / n for k in range(n)]


def _decode(source, limits: MultiModalConfig, sampling: VideoSampling) -> Video:
    try:
        import av
    except ImportError as e:
        raise InputError("this server cannot decode videos: PyAV is not installed (pip install av)") from e

    try:
        with av.open(source, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise InputError("the file has no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration(container, stream)
            if duration is not None and duration > limits.max_video_seconds:
                raise InputError(f"video is {duration:.1f} s long, over the limit of {limits.max_video_seconds} s")
            w, h = stream.codec_context.width, stream.codec_context.height
            if not w or not h:  # data FFmpeg took for a stream it cannot size (an image's bytes, say)
                raise InputError("cannot read video: its video stream has no frame size")
            _check_size(w, h, limits)
            rate = stream.average_rate
            count = stream.frames or (round(duration * rate) if duration and rate else None)  # WebM: no count
            targets = sample_times(duration, sampling, count)
            taken, previous = [], None
            for index, frame in enumerate(container.decode(stream)):
                t = frame.time if frame.time is not None else index / float(stream.average_rate or 1)
                if t > limits.max_video_seconds or index >= FPS_LIMIT * limits.max_video_seconds:
                    raise InputError(f"video is longer than the limit of {limits.max_video_seconds} s")
                while targets and previous is not None and t > targets[0] + 1e-6:
                    taken.append(previous)  # the frame showing at targets[0]
                    targets.pop(0)
                if not targets:
                    break
                previous = frame
            if previous is None:
                raise InputError("video has no frames")
            # Times past the last frame see it: all of them within a clip of known length, else those it spans.
            end = duration if duration is not None else (previous.time or 0.0) + 1e-6
            taken += [previous for t in targets if t <= end]
            frames = [f.to_image() for f in taken]
    except InputError:
        raise
    except av.error.FFmpegError as e:  # its str has the errno and a '<none>' file name of an in-memory source
        raise InputError(f"cannot read video: {e.strerror or e}") from e
    except (OSError, ValueError, IndexError) as e:
        raise InputError(f"cannot read video: {e}") from e
    return _checked(frames, _sampled_fps(len(frames), duration, sampling), limits)


def _duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # av.time_base
    return None


def _sampled_fps(count: int, duration: float | None, sampling: VideoSampling) -> float:
    """Sampled frames per second of video: count / duration (transformers' `sampled_fps`), or the sampling rate
    for a clip of unknown length."""
    return count / duration if duration else sampling.fps


def encode_video(frames: Sequence[Image.Image], fps: float, container: str = "mp4") -> bytes:
    """Frames as an MP4 (H.264) or WebM (VP9) clip at `fps` (even sides: 4:2:0 chroma). Tests and the bench client
    make their clips with it."""
    import av

    codec = {"mp4": "libx264", "webm": "libvpx-vp9"}[container]
    w, h = frames[0].size
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(image.convert("RGB"))))
        out.mux(stream.encode())
    return buf.getvalue()


def video_data_url(frames: Sequence[Image.Image], fps: float, container: str = "mp4") -> str:
    """Frames as the `data:video/...;base64,` URL a `video_url` part carries."""
    return f"data:video/{container};base64," + base64.b64encode(encode_video(frames, fps, container)).decode()
