"""Qwen2-VL specifics against transformers: prompt expansion, M-RoPE positions, legacy checkpoint layouts."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from valora import LLM, LoRARequest, SamplingParams
from valora.testing.images import random_image

IMG = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=16)


def _hf_processor(model_dir):
    """transformers' own Qwen2VLProcessor; without torchvision it must be built image-only (see cpu_setup)."""
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(model_dir)
    return ImageOnlyQwen2VLProcessor(AutoImageProcessor.from_pretrained(model_dir), tok)


@pytest.mark.parametrize("sizes", [[(80, 100)], [(56, 56), (112, 90)], [(140, 60), (56, 112), (70, 70)]])
def test_prompt_and_positions_match_transformers(llm, tiny_model, sizes):
    from transformers import AutoModelForImageTextToText

    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = "intro " + " middle ".join(f"{IMG} picture {i}" for i in range(len(images))) + " end"
    ours = llm.engine.process_prompt({"prompt": text, "multi_modal_data": {"image": images}})[1]
    hf = _hf_processor(tiny_model)(text=[text], images=images, return_tensors="pt")
    assert ours.token_ids == hf["input_ids"][0].tolist()
    assert torch.equal(torch.cat([i.data["pixel_values"] for i in ours.images]), hf["pixel_values"])
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    positions, delta = model.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"], hf["image_grid_thw"])
    assert torch.equal(ours.positions, positions[:, 0])
    assert ours.position_delta == int(delta)


def test_token_id_prompts_expand_single_placeholders(llm):
    image = random_image(80, 100)
    text = f"look {IMG} here"
    from_text = llm.engine.process_prompt({"prompt": text, "multi_modal_data": {"image": image}})[1]
    ids = llm.get_tokenizer()(text, add_special_tokens=False)["input_ids"]
    from_ids = llm.engine.process_prompt({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})[1]
    assert from_ids.token_ids == from_text.token_ids
    again = llm.engine.process_prompt({"prompt_token_ids": from_text.token_ids, "multi_modal_data": {"image": image}})
    assert again[1].token_ids == from_text.token_ids


def _other_layout_copy(src, dst):
    """The same checkpoint in the other of the two layouts in the wild: hub checkpoints (and transformers'
    save_pretrained) keep the LM at `model.*` and the ViT at `visual.*`; v5 module paths nest both under `model.`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    nested = any(k.startswith("model.language_model.") for k in tensors)
    if nested:
        out = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in tensors.items()}
    else:
        out = {("model.visual." + k[len("visual."):] if k.startswith("visual.") else
                "model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    assert out.keys() != tensors.keys()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_legacy_checkpoint_and_adapter_layouts(tiny_model, adapter_factory, tmp_path):
    adapter = adapter_factory(tiny_model, r=4, target_modules=["q_proj", "fc1"], seed=9)
    legacy_model = _other_layout_copy(tiny_model, tmp_path / "other-layout-model")
    legacy_adapter = tmp_path / "legacy-adapter"
    shutil.copytree(adapter, legacy_adapter)
    tensors = load_file(legacy_adapter / "adapter_model.safetensors")
    legacy = (("model.model.language_model.", "model.model."), ("model.model.visual.", "model.visual."))
    renamed = {k.replace(*legacy[0]).replace(*legacy[1]): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    (legacy_adapter / "adapter_model.safetensors").unlink()
    torch.save(renamed, legacy_adapter / "adapter_model.bin")  # and the older .bin format
    prompt = {"prompt": f"{IMG} caption :", "multi_modal_data": {"image": random_image(56, 84)}}
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

    def run(model_dir, adapter_dir):
        llm = LLM(str(model_dir), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
        return llm.generate(prompt, params, LoRARequest("a", 1, str(adapter_dir)), use_tqdm=False)[0]

    assert run(legacy_model, legacy_adapter).outputs[0].token_ids == run(tiny_model, adapter).outputs[0].token_ids


def test_rank_and_alpha_patterns_match_peft(tiny_model, adapter_factory, tmp_path):
    from valora.testing.reference import HFReference

    adapter = adapter_factory(tiny_model, r=8, target_modules=["q_proj", "v_proj", "up_proj"], seed=4)
    patterned = tmp_path / "patterned"
    shutil.copytree(adapter, patterned)
    tensors = load_file(patterned / "adapter_model.safetensors")
    tensors = {k: (v[:4] if "v_proj.lora_A" in k else v[:, :4] if "v_proj.lora_B" in k else v).contiguous()
               for k, v in tensors.items()}
    save_file(tensors, patterned / "adapter_model.safetensors")
    cfg = json.loads((patterned / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"v_proj": 4}
    cfg["alpha_pattern"] = {"up_proj": 3}
    (patterned / "adapter_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
    out = llm.generate("a dog runs", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       LoRARequest("p", 1, str(patterned)), use_tqdm=False)[0]
    processed = llm.engine.process_prompt("a dog runs")[1]
    assert out.outputs[0].token_ids == HFReference(str(tiny_model)).generate(processed, str(patterned), 8).token_ids


def test_checkpoint_problems_are_named(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("layers.0.input_layernorm.weight")))
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not know"):
        LLM(str(broken), dtype="float32", device="cpu")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path / "nowhere"), device="cpu")


def test_missing_weights_are_named(tiny_model, tmp_path):
    broken = tmp_path / "missing"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight")))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights.*gate_up_proj"):
        LLM(str(broken), dtype="float32", device="cpu")
