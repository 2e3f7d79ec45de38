"""Each family against transformers: prompt expansion and image tensors next to its own HF processor (and M-RoPE
positions next to `get_rope_index`), LoRA reaching every linear layer under PEFT's names, checkpoint and adapter
layouts of every transformers generation, and named loading errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from valora import LLM, LoRARequest, SamplingParams
from valora.errors import UserError
from valora.lora.adapter import load_adapter
from valora.models.layers.linear import LoRALinear
from valora.models.registry import resolve_family
from valora.multimodal.pixels import hf_tensors
from valora.testing.images import random_image


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=16)


def _hf_processor(family, model_dir, hf_config):
    """transformers' own processor for the family; Qwen's and InternVL's need torchvision for their video half,
    so on the CPU stack they are built image-only (see docs: cpu_setup)."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer, ProcessorMixin

    tok = AutoTokenizer.from_pretrained(model_dir)
    images = AutoImageProcessor.from_pretrained(model_dir)
    if family.name == "llava":
        return transformers.LlavaProcessor(
            image_processor=images, tokenizer=tok, patch_size=hf_config.vision_config.patch_size,
            vision_feature_select_strategy=hf_config.vision_feature_select_strategy, num_additional_image_tokens=1,
        )
    base = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
            "internvl": transformers.InternVLProcessor}[family.name]

    class ImageOnly(base):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kw):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            if family.name == "internvl":
                self.image_seq_length = hf_config.image_seq_length
                self.start_image_token, self.end_image_token = tok.start_image_token, tok.end_image_token
                self.start_image_token_id, self.end_image_token_id = tok.start_image_token_id, tok.end_image_token_id
                self.image_token, self.image_token_id = tok.context_image_token, tok.context_image_token_id
                self.video_token = tok.video_token
                self.multimodal_pattern = re.compile(f"(?P<image>{re.escape(self.image_token)})")
            else:
                self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
                self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tok.convert_tokens_to_ids(self.video_token)

    return ImageOnly(images, tok)


@pytest.mark.parametrize("sizes", [[(80, 100)], [(56, 56), (112, 90)], [(140, 60), (56, 112), (70, 70)]])
def test_prompt_matches_the_hf_processor(llm, family, tiny_model, sizes):
    from transformers import AutoModelForImageTextToText

    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = "intro " + " middle ".join(f"{family.image_prompt} picture {i}" for i in range(len(images))) + " end"
    ours = llm.engine.input_processor.process({"prompt": text, "multi_modal_data": {"image": images}})[1]
    hf = _hf_processor(family, tiny_model, llm.engine.core.hf_config)(text=[text], images=images, return_tensors="pt")
    assert ours.token_ids == hf["input_ids"][0].tolist()
    assert torch.equal(torch.cat([hf_tensors(i.data)["pixel_values"] for i in ours.images]), hf["pixel_values"])
    if ours.positions is None:
        return
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    positions, delta = model.model.get_rope_index(hf["input_ids"], hf["mm_token_type_ids"], hf["image_grid_thw"])
    assert torch.equal(ours.positions, positions[:, 0])
    assert ours.position_delta == int(delta)


def test_token_id_prompts_expand_single_placeholders(llm, family):
    image = random_image(80, 100)
    text = f"look {family.image_prompt} here"
    from_text = llm.engine.input_processor.process({"prompt": text, "multi_modal_data": {"image": image}})[1]
    ids = llm.get_tokenizer()(text)["input_ids"]
    from_ids = llm.engine.input_processor.process({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})[1]
    assert from_ids.token_ids == from_text.token_ids
    inputs = llm.engine.input_processor
    again = inputs.process({"prompt_token_ids": from_text.token_ids, "multi_modal_data": {"image": image}})
    assert again[1].token_ids == from_text.token_ids


def test_lora_reaches_every_linear_layer_under_peft_names(llm, family, tiny_model, adapter_factory):
    """One adapter on every linear layer PEFT sees in the HF model (patch embedding convolution included) lands
    on every LoRA layer of ours, slice by slice, and nothing of ours is left without it."""
    target = "|".join(family.targets(part) for part in ("vision", "projector", "lm"))
    adapter = adapter_factory(tiny_model, r=2, target_modules=target, seed=5)
    model = llm.engine.core.model
    loaded = load_adapter("all", adapter, model, model.mapper, 16, torch.float32)
    ours = {(n, s if m.num_slices > 1 else None) for n, m in model.named_modules() if isinstance(m, LoRALinear)
            for s in range(m.num_slices)}
    assert set(loaded.weights) == ours


# The layouts in the wild, as renames of v5 module paths (what PEFT keys use): hub checkpoints of each family,
# including LLaVA's CLIP tower saved with its inner `vision_model.` module.
HUB_LAYOUT = {
    "qwen2_vl": ((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")),
    "llava": ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
              (r"^model\.vision_tower\.", "vision_tower.vision_model."), (r"^model\.multi_modal_projector\.",
                                                                          "multi_modal_projector.")),
    "internvl": ((r"^model\.language_model\.", "language_model.model."), (r"^lm_head\.", "language_model.lm_head."),
                 (r"^model\.(vision_tower|multi_modal_projector)\.", r"\1.")),
}
HUB_LAYOUT["qwen2_5_vl"] = HUB_LAYOUT["qwen2_vl"]


def _rename(names: dict, rules) -> dict:
    out = {}
    for k, v in names.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def _tied(model_dir) -> bool:
    cfg = json.loads((model_dir / "config.json").read_text())
    return bool(cfg.get("tie_word_embeddings") or cfg.get("text_config", {}).get("tie_word_embeddings"))


def test_checkpoint_and_adapter_layouts(family, tiny_model, adapter_factory, tmp_path):
    """The checkpoint as `save_pretrained` wrote it, with v5 module paths, and in the hub's layout; the adapter as
    PEFT saved it and with hub-layout keys in the older .bin format: all give the same outputs."""
    from transformers import AutoModelForImageTextToText

    adapter = adapter_factory(tiny_model, r=4, target_modules=f"{family.targets('vision')}|{family.targets('lm')}",
                              seed=9)
    live = {k: v.contiguous() for k, v in AutoModelForImageTextToText.from_pretrained(tiny_model).state_dict().items()}
    if _tied(tiny_model):
        live.pop("lm_head.weight")
    layouts = {"v5": live, "hub": _rename(live, HUB_LAYOUT[family.name])}
    dirs = {"saved": tiny_model}
    for name, tensors in layouts.items():
        d = tmp_path / name
        shutil.copytree(tiny_model, d)
        save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
        dirs[name] = d
    assert set(layouts["v5"]) != set(layouts["hub"])

    hub_adapter = tmp_path / "hub-adapter"
    shutil.copytree(adapter, hub_adapter)
    tensors = load_file(hub_adapter / "adapter_model.safetensors")
    prefix = "base_model.model."
    renamed = {prefix + k: v for k, v in _rename({k[len(prefix):]: v for k, v in tensors.items()},
                                                 HUB_LAYOUT[family.name]).items()}
    assert renamed.keys() != tensors.keys()
    (hub_adapter / "adapter_model.safetensors").unlink()
    torch.save(renamed, hub_adapter / "adapter_model.bin")

    prompt = {"prompt": f"{family.image_prompt} caption :", "multi_modal_data": {"image": random_image(56, 84)}}
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = set()
    for model_dir in dirs.values():
        llm = LLM(str(model_dir), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
        for i, adapter_dir in enumerate((adapter, hub_adapter)):
            lora = LoRARequest(adapter_dir.name, i + 1, str(adapter_dir))
            out = llm.generate(prompt, params, lora, use_tqdm=False)
            outputs.add(tuple(out[0].outputs[0].token_ids))
            llm.engine.core.remove_lora(adapter_dir.name)
    assert len(outputs) == 1


@pytest.mark.families("qwen2_vl")
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
    processed = llm.engine.input_processor.process("a dog runs")[1]
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
    with pytest.raises(UserError, match="does not exist"):
        LLM(str(tmp_path / "nowhere"), device="cpu")


def test_missing_weights_are_named(tiny_model, tmp_path):
    broken = tmp_path / "missing"
    shutil.copytree(tiny_model, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors.pop(next(k for k in tensors if k.endswith("layers.1.mlp.up_proj.weight")))
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks 1 weights.*gate_up_proj"):
        LLM(str(broken), dtype="float32", device="cpu")


def test_unsupported_architecture_lists_the_supported_ones():
    from transformers import PretrainedConfig

    with pytest.raises(ValueError, match="supported: .*InternVL.*Llava.*Qwen2VL.*Qwen2_5_VL"):
        resolve_family(PretrainedConfig(architectures=["MllamaForConditionalGeneration"]))
