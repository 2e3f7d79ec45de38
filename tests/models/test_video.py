"""Video input against transformers. transformers' video processors need torchvision (absent here), so Qwen2-VL's
video tensors are checked against its image processor applied to each frame plus the documented temporal layout
(two consecutive frames per temporal patch, the last frame repeated to fill one); M-RoPE positions against
`get_rope_index` (Qwen2.5-VL's time spacing included); and greedy outputs for a short clip against transformers'
own model fed the same tensors, for Qwen2-VL, Qwen2.5-VL and InternVL (frames as images, as its processor
writes them). LLaVA has no video placeholder and says so."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from valora import LLM, SamplingParams
from valora.multimodal.inputs import InputError
from valora.multimodal.pixels import hf_tensors
from valora.multimodal.video import Video, encode_video
from valora.testing.images import random_image
from valora.testing.reference import HFReference, hf_inputs

STEPS = 8


def _clip(count: int = 5, h: int = 56, w: int = 84) -> list:
    return [random_image(h, w, seed=10 + i) for i in range(count)]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device="cpu")


@pytest.mark.families("qwen2_vl", "qwen2_5_vl")
@pytest.mark.parametrize("frames", [1, 2, 3, 6])
def test_qwen_video_tensors_are_the_image_processor_per_frame(family, tiny_model, tmp_path, frames):
    """With the video processor's own settings (here a video_preprocessor_config.json unlike the image one)."""
    from transformers import AutoConfig, AutoTokenizer, Qwen2VLImageProcessorPil

    from valora.models.registry import resolve_family

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    (model_dir / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 28 * 28,
                                                                           "max_pixels": 56 * 84}))
    cfg = AutoConfig.from_pretrained(model_dir)
    ours = resolve_family(cfg).processor_cls(model_dir, cfg, AutoTokenizer.from_pretrained(model_dir))
    clip = _clip(frames, 90, 120)
    (run,) = ours.video_runs(Video(clip, fps=3.0))

    per_frame = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=56 * 84)
    t, p = 2, 14
    patches = [per_frame(images=[f], return_tensors="pt")["pixel_values"] for f in clip]
    patches += patches[-1:] * (-len(patches) % t)  # the last frame fills the last temporal patch
    # Each image's patches hold the frame twice (its own temporal patch); a video's take one frame per slot.
    slots = [x.view(x.shape[0], 3, t, p, p)[:, :, 0] for x in patches]
    expected = torch.cat([torch.stack(slots[i : i + t], dim=2).flatten(1) for i in range(0, len(slots), t)])
    grid = per_frame(images=[clip[0]], return_tensors="pt")["image_grid_thw"]
    assert torch.equal(hf_tensors(run.data)["pixel_values_videos"], expected)
    assert run.data["video_grid_thw"].tolist() == [[len(slots) // t, *grid[0, 1:].tolist()]]
    assert run.num_tokens == expected.shape[0] // 4
    if family.name == "qwen2_5_vl":
        assert run.data["second_per_grid_ts"].tolist() == pytest.approx([2 / 3.0])
    else:
        assert "second_per_grid_ts" not in run.data


@pytest.mark.families("qwen2_vl", "qwen2_5_vl")
def test_video_positions_match_get_rope_index(llm, family, tiny_model):
    from transformers import AutoModelForImageTextToText

    clip = Video(_clip(5), fps=3.0)
    prompt = f"intro {family.image_prompt} then {family.video_prompt} and {family.video_prompt} end"
    ours = llm.engine.input_processor.process({"prompt": prompt, "multi_modal_data": {
        "image": random_image(60, 100, seed=1), "video": [clip, Video(_clip(2, 84, 56), fps=0.5)]}})[1]
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    kw = hf_inputs(model, ours, "cpu")
    rope = {k: kw[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in kw}
    positions, delta = model.model.get_rope_index(kw["input_ids"], kw["mm_token_type_ids"], **rope)
    assert torch.equal(ours.positions, positions[:, 0])
    assert ours.position_delta == int(delta)


@pytest.mark.families("qwen2_vl", "qwen2_5_vl", "internvl")
@pytest.mark.parametrize("container", ["mp4", "webm"])
def test_greedy_video_outputs_match_transformers(llm, family, tiny_model, container):
    clip = encode_video(_clip(5, 64, 96), fps=2, container=container)
    prompts = [
        {"prompt": f"{family.video_prompt} what happens ?", "multi_modal_data": {"video": clip}},
        {"prompt": f"{family.image_prompt} and {family.video_prompt} compare :",
         "multi_modal_data": {"image": random_image(70, 50, seed=4), "video": clip},
         "media_io_kwargs": {"video": {"fps": 1.5, "num_frames": 3}}},
    ]
    params = SamplingParams(temperature=0, max_tokens=STEPS, ignore_eos=True)
    reference = HFReference(str(tiny_model))
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        processed = llm.engine.input_processor.process(prompt)[1]
        assert out.outputs[0].token_ids == reference.generate(processed, None, STEPS).token_ids


@pytest.mark.families("internvl")
def test_internvl_video_is_its_frames_as_labelled_images(llm, family):
    """`<video>` -> "Frame1: <img>...</img>\\nFrame2: ..." with one tile per frame, as InternVLProcessor writes
    it: the same prompt as the frames sent as images in that text (square frames of the tile size: one tile)."""
    frames = _clip(3, 32, 32)
    as_video = llm.engine.input_processor.process({"prompt": f"look {family.video_prompt} ok",
                                          "multi_modal_data": {"video": Video(frames, fps=2.0)}})[1]
    text = "look " + "\n".join(f"Frame{i + 1}: {family.image_prompt}" for i in range(3)) + " ok"
    as_images = llm.engine.input_processor.process({"prompt": text, "multi_modal_data": {"image": frames}})[1]
    assert as_video.token_ids == as_images.token_ids
    for v, i in zip(as_video.images, as_images.images, strict=True):
        assert torch.equal(hf_tensors(v.data)["pixel_values"], hf_tensors(i.data)["pixel_values"])
        assert v.offset == i.offset


@pytest.mark.families("llava")
def test_llava_takes_no_videos(llm, family):
    with pytest.raises(InputError, match="takes no videos"):
        llm.engine.input_processor.process({"prompt": f"{family.image_prompt} hi", "multi_modal_data": {
            "video": _clip(2)}})


@pytest.mark.families("qwen2_vl")
def test_video_placeholders_must_match_the_videos(llm, family):
    clip = Video(_clip(2), fps=2.0)
    with pytest.raises(InputError, match="1 video placeholders .* but 2 videos"):
        llm.engine.input_processor.process({"prompt": f"{family.video_prompt} hi", "multi_modal_data": {
            "video": [clip, clip]}})
    with pytest.raises(InputError, match="0 video placeholders"):
        llm.engine.input_processor.process({"prompt": "hi", "multi_modal_data": {"video": clip}})
    ids = llm.get_tokenizer()(f"{family.video_prompt} hi")["input_ids"]
    from_ids = llm.engine.input_processor.process({"prompt_token_ids": ids, "multi_modal_data": {"video": clip}})[1]
    from_text = llm.engine.input_processor.process({"prompt": f"{family.video_prompt} hi", "multi_modal_data": {
        "video": clip}})[1]
    assert from_ids.token_ids == from_text.token_ids


@pytest.mark.families("llava")
def test_llava_chat_takes_a_video_as_its_frames(llm, family):
    """In chat, a model without a video placeholder gets a video part as one image part per sampled frame."""
    frames = _clip(3, 40, 40)

    def prompt(parts):
        chat = llm.chat_prompt([{"role": "user", "content": [*parts, {"type": "text", "text": "what is it ?"}]}])
        return llm.engine.input_processor.process(chat)[1]

    still = random_image(40, 40, seed=99)
    as_video = prompt([{"type": "image", "image": still}, {"type": "video", "video": frames}])
    as_images = prompt([{"type": "image", "image": img} for img in (still, *frames)])
    assert as_video.token_ids == as_images.token_ids and len(as_video.images) == 4
    for v, i in zip(as_video.images, as_images.images, strict=True):
        assert torch.equal(hf_tensors(v.data)["pixel_values"], hf_tensors(i.data)["pixel_values"])
    with pytest.raises(InputError, match="frames as images"):
        prompt([{"type": "video", "video": _clip(9, 40, 40)}])


@pytest.mark.families("qwen2_vl", "qwen2_5_vl")
def test_a_video_hash_names_what_moves_its_positions(llm, family):
    """The content hash keys the embedding cache and the prefix cache's blocks: on Qwen2.5-VL the same frames at
    another frame rate sit at other positions, so they must not share KV blocks."""
    frames = _clip(2)

    def digest(fps: float) -> str:
        return llm.engine.input_processor.process({"prompt": f"{family.video_prompt} hi", "multi_modal_data": {
            "video": Video(frames, fps=fps)}})[1].images[0].content_hash

    assert (digest(2.0) != digest(1.0)) == (family.name == "qwen2_5_vl")
    assert digest(2.0) == digest(2.0)
