"""Video decoding (PyAV) and sampling: MP4 and WebM clips made here, frames kept uniformly in time at `fps` up to
`num_frames`, frame lists taken as given, and every limit (bytes, length, frames, pixels) or unreadable input an
`InputError` with the reason."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from valora.config import MultiModalConfig
from valora.multimodal.inputs import InputError
from valora.multimodal.video import Video, VideoSampling, as_videos, encode_video, load_video, video_sampling

LIMITS = MultiModalConfig()


def _flat(level: int, h: int = 48, w: int = 64) -> Image.Image:
    return Image.fromarray(np.full((h, w, 3), level, np.uint8))


# 10 frames at 4 fps (2.5 s): frame i is a flat grey of level 20 i, so a kept frame says which one it was.
FRAMES = [_flat(20 * i) for i in range(10)]


def _levels(video: Video) -> list[int]:
    return [round(float(np.asarray(f).mean()) / 20) for f in video.frames]


@pytest.fixture(scope="module", params=["mp4", "webm"])
def clip(request) -> bytes:
    return encode_video(FRAMES, fps=4, container=request.param)


@pytest.mark.parametrize("sampling, levels, fps", [
    (VideoSampling(fps=2, num_frames=32), [0, 2, 4, 6, 8], 2.0),  # 2 a second over 2.5 s
    (VideoSampling(fps=1, num_frames=32), [0, 5], 0.8),
    (VideoSampling(fps=2, num_frames=3), [0, 3, 6], 1.2),  # capped: 3 spread over the clip
    (VideoSampling(fps=100, num_frames=32), list(range(10)), 4.0),  # never more than the clip has
])
def test_frames_are_sampled_uniformly_in_time(clip, sampling, levels, fps):
    video = load_video(clip, LIMITS, sampling)
    assert _levels(video) == levels
    assert video.fps == pytest.approx(fps)
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in video.frames)


def test_a_local_file_and_the_defaults(clip, tmp_path):
    path = tmp_path / "clip.bin"
    path.write_bytes(clip)
    assert _levels(load_video(path, MultiModalConfig(video_fps=2.0, video_num_frames=4))) == [0, 2, 5, 7]


def test_frame_lists_are_taken_as_given():
    frames = [_flat(10), _flat(20), _flat(30)]
    for given in (frames, [np.asarray(f) for f in frames], np.stack([np.asarray(f) for f in frames])):
        video = load_video(given, LIMITS, VideoSampling(fps=3.0))
        assert [np.asarray(f).mean() for f in video.frames] == [10, 20, 30] and video.fps == 3.0


def test_one_video_or_a_list_of_videos():
    frames = [_flat(1), _flat(2)]
    assert as_videos(frames) == [frames]
    assert as_videos(np.stack([np.asarray(f) for f in frames]))[0].shape == (2, 48, 64, 3)
    assert as_videos([b"a", b"b"]) == [b"a", b"b"]
    assert as_videos([frames, frames]) == [frames, frames]
    assert as_videos(None) == [] and as_videos(b"x") == [b"x"]


@pytest.mark.parametrize("limits, sampling, message", [
    (MultiModalConfig(max_video_bytes=100), None, "over the limit of 100"),
    (MultiModalConfig(max_video_seconds=2.0), None, "2.5 s long, over the limit of 2.0 s"),
    (MultiModalConfig(max_image_pixels=1000), None, "64x48 pixels, over the limit of 1000"),
    (MultiModalConfig(max_video_frames=8), VideoSampling(num_frames=9), "9 video frames asked for"),
])
def test_limits(clip, limits, sampling, message):
    with pytest.raises(InputError, match=message):
        load_video(clip, limits, sampling)


@pytest.mark.parametrize("given, message", [
    (b"\x00\x00\x00\x18ftypmp42 not really a video", "cannot read video"),
    (b"", "cannot read video"),
    (b"RIFF0000WAVEfmt ", "^cannot read video: Invalid data found when processing input$"),  # no errno, no '<none>'
    (b"\x89PNG\r\n\x1a\n", "cannot read video: its video stream has no frame size"),  # not "0x0 pixels"
    ([], "no frames"),
    ([_flat(1), _flat(2, 50, 64)], "differ in size"),
    ([np.zeros((4, 4), np.uint8)], "HxWx3 uint8"),
    ([_flat(1, 2, 64)], "at least 4"),
    ({"not": "a video"}, "unsupported video type"),
])
def test_unreadable_videos(given, message):
    with pytest.raises(InputError, match=message):
        load_video(given, LIMITS)


def test_a_still_image_file_is_a_one_frame_clip(tmp_path):
    path = tmp_path / "still.png"
    FRAMES[3].save(path)
    assert _levels(load_video(path, LIMITS)) == [3]  # no length known: sampled at fps while frames last


@pytest.mark.parametrize("kwargs, message", [
    ({"video": {"fps": 0}}, "fps must be a positive number"),
    ({"video": {"num_frames": 2.5}}, "num_frames must be a positive integer"),
    ({"video": {"speed": 2}}, "'fps' and 'num_frames'"),
    ({"audio": {}}, "media_io_kwargs takes"),
    ("fast", "media_io_kwargs takes"),
])
def test_request_sampling_options_are_checked(kwargs, message):
    with pytest.raises(InputError, match=message):
        video_sampling(LIMITS, kwargs)
    assert video_sampling(LIMITS, {"video": {"num_frames": 5}}) == VideoSampling(LIMITS.video_fps, 5)
