"""Workloads: the shipped traces, rescaled arrivals, Zipf and hot-adapter skew, task mixes and real images, all
seeded; the defects of the original harness (a trace cut to 5 requests, skew that is not Zipf, unseeded draws)
are each checked against."""

from __future__ import annotations

import base64
import io
from importlib import resources

import numpy as np
import pytest
from PIL import Image

from valora.bench.images import ImageRef, data_url, render
from valora.bench.traces import load_trace
from valora.bench.workload import MIXES, Arrivals, Skew, Workload

ADAPTERS = tuple(f"a{i}" for i in range(16))


def test_shipped_traces_with_attribution():
    conv, code = load_trace("conv"), load_trace("code")
    assert (len(conv), len(code)) == (19366, 8819)  # the whole published files
    assert conv.rate == pytest.approx(5.53, abs=0.01) and code.rate == pytest.approx(2.57, abs=0.01)
    assert np.all(np.diff(conv.arrival_s) >= 0) and conv.arrival_s[0] == 0
    assert (conv.prompt_tokens[:3].tolist(), conv.output_tokens[:3].tolist()) == ([374, 396, 879], [44, 109, 55])
    notice = (resources.files("valora.bench") / "traces" / "NOTICE").read_text()
    assert "CC BY 4.0" in notice and "Splitwise" in notice


def test_trace_window_is_rescaled_not_truncated():
    trace = load_trace("conv")
    rng = np.random.default_rng(0)
    times, rows = trace.window(2000, 10.0, rng)
    assert len(times) == 2000 and times[0] == 0 and np.all(np.diff(rows) == 1)
    original = trace.arrival_s[rows[0]:rows[-1] + 2] - trace.arrival_s[rows[0]]
    scale = (2000 / 10.0) / original[-1]  # the window lasts exactly n / rate, up to request n+1
    np.testing.assert_allclose(times, original[:-1] * scale)  # burst shape kept
    assert 2000 / (original[-1] * scale) == pytest.approx(10.0)


@pytest.mark.parametrize("kind,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_renewal_arrivals_have_the_rate_and_burstiness_asked(kind, cv):
    times, rows = Arrivals(kind, cv=cv).times(20000, 8.0, np.random.default_rng(1))
    gaps = np.diff(times)
    assert rows is None and times[0] == 0
    assert 1 / gaps.mean() == pytest.approx(8.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_zipf_skew_is_zipf():
    w = Workload("vqa", 50.0, 100.0, ADAPTERS, arrivals=Arrivals("poisson"), skew=Skew("zipf", alpha=1.2), seed=5)
    reqs = w.requests()
    counts = np.array([sum(r.adapter == a for r in reqs) for a in ADAPTERS])
    p = 1 / np.arange(1, 17) ** 1.2
    p /= p.sum()
    n = len(reqs)
    assert n == 5000
    assert np.all(np.abs(counts - n * p) < 4 * np.sqrt(n * p * (1 - p)) + 1)  # every adapter within 4 sigma
    assert counts[0] > counts[1] > counts[3] > counts[15]


def test_hot_skew_sends_the_fraction_to_one_adapter():
    w = Workload("vqa", 40.0, 100.0, ADAPTERS, arrivals=Arrivals("poisson"), skew=Skew.parse("hot:0.6"), seed=2)
    reqs = w.requests()
    share = np.mean([r.adapter == "a0" for r in reqs])
    assert share == pytest.approx(0.6, abs=0.03)
    rest = np.array([sum(r.adapter == a for r in reqs) for a in ADAPTERS[1:]])
    assert rest.min() > 0.5 * rest.mean()  # the others share the rest evenly
    assert Skew.parse("hot:0.6").label == "hot0.6" and Skew.parse("zipf:1").label == "zipf1"
    with pytest.raises(ValueError):
        Skew.parse("pareto:2")


def test_seeded_and_shared_across_policies_and_skews():
    a = Workload("retrieval", 4.0, 30.0, ADAPTERS, warmup_s=5.0, seed=7)
    assert a.requests() == a.requests()  # same seed: the same requests for every policy
    assert a.requests() != Workload("retrieval", 4.0, 30.0, ADAPTERS, warmup_s=5.0, seed=8).requests()
    hot = Workload("retrieval", 4.0, 30.0, ADAPTERS, warmup_s=5.0, skew=Skew("hot", fraction=0.9), seed=7).requests()
    base = a.requests()
    # Changing the skew changes only the adapters: arrivals, tasks, prompts and images stay, so skews compare.
    assert [(r.arrival_s, r.task, r.prompt, r.images) for r in hot] == [(r.arrival_s, r.task, r.prompt, r.images)
                                                                       for r in base]
    assert [r.adapter for r in hot] != [r.adapter for r in base]
    assert sum(r.warmup for r in base) == sum(r.arrival_s < 5.0 for r in base) > 0


def test_task_mixes_follow_the_paper():
    trace = load_trace("conv")
    reqs = Workload("vqa", 5.0, 200.0, ADAPTERS, seed=0).requests()
    assert np.all(np.diff([r.trace_row for r in reqs]) == 1)  # consecutive trace requests
    for r in reqs:  # VQA and caption: one image, output min(120, trace)
        assert len(r.images) == 1 and r.images[0].size == (448, 448)
        assert r.output_tokens == min(120, trace.output_tokens[r.trace_row])
        if r.task == "vqa":
            assert len(r.prompt.split()) == int(np.clip(round(trace.prompt_tokens[r.trace_row] * 0.05), 8, 256))
    video = Workload("video", 9.0, 200.0, ADAPTERS, seed=0).requests()
    share = np.mean([r.task == "action" for r in video])
    assert share == pytest.approx(7 / 9, abs=0.05)
    for r in video:
        if r.task == "action":  # six frames of one picture, one answer token, some frames repeated
            assert len(r.images) == 6 and r.output_tokens == 1 and len({i.picture for i in r.images}) == 1
        else:
            assert (len(r.images), r.output_tokens, len(r.prompt.split())) == (1, 40, 256)
    repeats = sum(len(set(r.images)) < 6 for r in video if r.task == "action")
    assert 0 < repeats < sum(r.task == "action" for r in video)
    ground = Workload("grounding", 2.0, 10.0, ADAPTERS, image_size=(56, 84)).requests()
    assert all(r.output_tokens == 24 and r.images[0].size == (56, 84) for r in ground)
    assert set(MIXES) == {"vqa", "video", "grounding", "retrieval"}


def test_images_are_real_resized_and_repeat_exactly():
    ref = ImageRef(picture=0, frame=0, size=(96, 64))
    img = render(ref)
    a = np.asarray(img)
    assert img.size == (96, 64) and a.std() > 20  # a photo, not noise-free flat colour
    digit = np.asarray(render(ImageRef(1, 0, (32, 32))))
    assert digit.std() > 20
    decoded = Image.open(io.BytesIO(base64.b64decode(data_url(ref).split(",", 1)[1])))
    assert decoded.format == "JPEG" and decoded.size == (96, 64)
    assert data_url(ImageRef(0, 3, (96, 64))) == data_url(ImageRef(0, 3, (96, 64)))
    assert data_url(ImageRef(0, 3, (96, 64))) != data_url(ImageRef(0, 4, (96, 64)))  # the camera pans


def test_video_requests_send_their_frames_as_one_clip():
    """An `action` request is one MP4 clip of its 6 frames, sampled by the server at the rate it was made at, so
    the server sees exactly those frames; other requests stay images."""
    from valora.bench.client import chat_body
    from valora.config import MultiModalConfig
    from valora.multimodal.chat import MediaSources
    from valora.multimodal.video import load_video, video_sampling

    requests = Workload("video", 9.0, 30.0, ADAPTERS, seed=0, image_size=(64, 48)).requests()
    action = next(r for r in requests if r.task == "action")
    body = chat_body(action)
    (part, text) = body["messages"][0]["content"]
    assert part["type"] == "video_url" and text["type"] == "text" and action.video
    data = MediaSources().resolve(part["video_url"]["url"], 1 << 20, "video")
    limits = MultiModalConfig()
    video = load_video(data, limits, video_sampling(limits, body["media_io_kwargs"]))
    assert len(video.frames) == 6 and video.fps == pytest.approx(2.0)
    for frame, ref in zip(video.frames, action.images):  # H.264 is lossy: the same pictures, nearly
        assert np.abs(np.asarray(frame, np.float32) - np.asarray(render(ref), np.float32)).mean() < 12
    detect = next(r for r in requests if r.task == "detect")
    assert [p["type"] for p in chat_body(detect)["messages"][0]["content"]] == ["image_url", "text"]
    assert "media_io_kwargs" not in chat_body(detect) and not detect.video
