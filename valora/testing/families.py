"""Per-family recipes for synthetic checkpoints: HF config, tokenizer tokens and chat template, image processor,
and the PEFT target names of each part of the model. `checkpoints.build_model` turns one into a model directory.

Config knobs share one vocabulary across families (text: `hidden_size`, `num_key_value_heads`, ...; vision:
`vision_depth`, `vision_embed_dim`, `vision_num_heads`, `vision_intermediate_size`), so tests and benchmarks can
sweep every family with the same code; knobs that only one family has are named as that family's HF config names
them (`window_size`, `vision_feature_layer`, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TinyFamily:
    name: str  # the registry's family name (and HF model_type)
    architecture: str
    special_tokens: tuple[str, ...]
    eos: str
    pad: str
    bos: str
    image_token: str
    chat_template: str
    image_prompt: str  # one image in a prompt, as the chat template writes it
    video_prompt: str | None  # one video in a prompt, as the chat template writes it (None: no video placeholder)
    vision: tuple[str, tuple[str, ...]]  # (module scope, PEFT leaf names of every linear layer of the vision tower)
    projector: tuple[str, tuple[str, ...]]
    config: Callable[..., Any]  # (vocab_size, token_ids, **knobs) -> HF config
    image_processor: Callable[..., Any]  # (**knobs) -> HF image processor
    image_knobs: frozenset[str]  # knobs of the image processor (those also in `shared_knobs` go to the config too)
    shared_knobs: frozenset[str] = frozenset()
    config_tokens: dict[str, str] = field(default_factory=dict)  # further token ids the config names
    named_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer attributes (InternVL's <img> ...)
    add_bos: bool = False  # the tokenizer prepends BOS to every encoding (Llama's)
    template_in_processor: bool = False  # the chat template ships as the processor's chat_template.json

    def token_ids(self, tokenizer) -> dict[str, int]:
        tokens = {"eos": self.eos, "pad": self.pad, "bos": self.bos, "image": self.image_token} | self.config_tokens
        return {k: tokenizer.convert_tokens_to_ids(t) for k, t in tokens.items()}

    def targets(self, part: str, leaves: tuple[str, ...] | None = None) -> str:
        """A PEFT target regex for the linear layers of one part: "vision", "projector" or "lm" (all of a part's
        layers unless `leaves` narrows them)."""
        from valora.testing.checkpoints import peft_target_regex

        scope, all_leaves = {"vision": self.vision, "projector": self.projector,
                             "lm": ("language_model", LM_LINEARS)}[part]
        return peft_target_regex(leaves or all_leaves, scope)


def text_config(vocab_size: int, ids: dict[str, int], *, hidden_size: int = 64, intermediate_size: int = 128,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                max_position_embeddings: int = 4096, initializer_range: float = 0.02, rope_theta: float = 1e6,
                tie_word_embeddings: bool = False, **extra) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, **extra,
    )


# -- Qwen2-VL and Qwen2.5-VL -------------------------------------------------------------------------------------

QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")

# Qwen2-VL's chat format: system turn by default, each image as <|vision_start|><|image_pad|><|vision_end|>, each
# video as <|vision_start|><|video_pad|><|vision_end|>.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _mrope_text(vocab_size: int, ids: dict[str, int], **kw) -> dict:
    """Qwen's M-RoPE sections from the head size, in Qwen2-VL's proportions ([1/4, 3/8, 3/8] of head_dim/2)."""
    text = text_config(vocab_size, ids, **kw)
    half = text["hidden_size"] // text["num_attention_heads"] // 2
    t = half // 4
    h = (half - t) // 2
    text["rope_parameters"]["mrope_section"] = [t, h, half - t - h]
    return text


def _qwen_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(image_token_id=ids["image"], video_token_id=ids["video"],
                vision_start_token_id=ids["vision_start"], vision_end_token_id=ids["vision_end"])


def qwen2_vl_config(vocab_size: int, ids: dict[str, int], *, vision_depth: int = 2, vision_embed_dim: int = 32,
                    vision_num_heads: int = 2, **kw):
    from transformers import Qwen2VLConfig

    text = _mrope_text(vocab_size, ids, **kw)
    vision = dict(depth=vision_depth, embed_dim=vision_embed_dim, hidden_size=text["hidden_size"],
                  num_heads=vision_num_heads, initializer_range=text["initializer_range"])
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                         **_qwen_ids(ids))


def qwen2_5_vl_config(vocab_size: int, ids: dict[str, int], *, vision_depth: int = 2, vision_embed_dim: int = 32,
                      vision_num_heads: int = 2, vision_intermediate_size: int | None = None, window_size: int = 56,
                      fullatt_block_indexes: tuple[int, ...] = (1,), **kw):
    from transformers import Qwen2_5_VLConfig

    text = _mrope_text(vocab_size, ids, **kw)
    vision = dict(depth=vision_depth, hidden_size=vision_embed_dim, out_hidden_size=text["hidden_size"],
                  intermediate_size=vision_intermediate_size or 2 * vision_embed_dim, num_heads=vision_num_heads,
                  window_size=window_size, fullatt_block_indexes=list(fullatt_block_indexes),
                  initializer_range=text["initializer_range"])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"],
                            **_qwen_ids(ids))


def qwen_image_processor(min_pixels: int = 56 * 56, max_pixels: int = 112 * 112):
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)


_QWEN = dict(
    special_tokens=QWEN_SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", bos="<|endoftext|>",
    image_token="<|image_pad|>", chat_template=QWEN_CHAT_TEMPLATE,
    image_prompt="<|vision_start|><|image_pad|><|vision_end|>",
    video_prompt="<|vision_start|><|video_pad|><|vision_end|>", projector=("merger", ("0", "2")),
    image_processor=qwen_image_processor, image_knobs=frozenset({"min_pixels", "max_pixels"}),
    config_tokens={"video": "<|video_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"},
)

QWEN2_VL = TinyFamily("qwen2_vl", "Qwen2VLForConditionalGeneration", vision=("visual", ("proj", "qkv", "fc1", "fc2")),
                      config=qwen2_vl_config, **_QWEN)
QWEN2_5_VL = TinyFamily("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                        vision=("visual", ("proj", "qkv", "gate_proj", "up_proj", "down_proj")),
                        config=qwen2_5_vl_config, **_QWEN)

# -- LLaVA-1.5 (CLIP + Llama) ----------------------------------------------------------------------------------

# llava-hf's template: the role in capitals, images first, then the text; it ships in chat_template.json.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_config(vocab_size: int, ids: dict[str, int], *, vision_depth: int = 2, vision_embed_dim: int = 32,
                 vision_num_heads: int = 2, vision_intermediate_size: int | None = None, image_size: int = 32,
                 patch_size: int = 8, vision_feature_layer: int | list[int] = -2,
                 vision_feature_select_strategy: str = "default", text_model_type: str = "llama", **kw):
    from transformers import LlavaConfig

    text = text_config(vocab_size, ids, **kw)
    text["rope_parameters"]["rope_theta"] = 10000.0
    vision = dict(model_type="clip_vision_model", hidden_size=vision_embed_dim, num_hidden_layers=vision_depth,
                  num_attention_heads=vision_num_heads, intermediate_size=vision_intermediate_size or
                  2 * vision_embed_dim, image_size=image_size, patch_size=patch_size, projection_dim=vision_embed_dim)
    tokens = (image_size // patch_size) ** 2 + (vision_feature_select_strategy == "full")
    return LlavaConfig(vision_config=vision, text_config=dict(model_type=text_model_type, **text),
                       image_token_index=ids["image"], image_seq_length=tokens,
                       vision_feature_layer=vision_feature_layer,
                       vision_feature_select_strategy=vision_feature_select_strategy,
                       tie_word_embeddings=text["tie_word_embeddings"])


def clip_image_processor(image_size: int = 32):
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


LLAVA = TinyFamily(
    "llava", "LlavaForConditionalGeneration", special_tokens=("<unk>", "<s>", "</s>", "<image>", "<pad>"),
    eos="</s>", pad="<pad>", bos="<s>", image_token="<image>", chat_template=LLAVA_CHAT_TEMPLATE,
    image_prompt="<image>", video_prompt=None,
    vision=("vision_tower", ("patch_embedding", "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")),
    projector=("multi_modal_projector", ("linear_1", "linear_2")), config=llava_config,
    image_processor=clip_image_processor, image_knobs=frozenset({"image_size"}), shared_knobs=frozenset({"image_size"}),
    add_bos=True, template_in_processor=True,
)

# -- InternVL (InternViT + Qwen2) ------------------------------------------------------------------------------

INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def internvl_config(vocab_size: int, ids: dict[str, int], *, vision_depth: int = 2, vision_embed_dim: int = 32,
                    vision_num_heads: int = 2, vision_intermediate_size: int | None = None, image_size: int = 32,
                    patch_size: int = 8, vision_feature_layer: int = -1, attention_bias: bool = True,
                    use_qk_norm: bool = False, norm_type: str = "layer_norm", use_mean_pooling: bool = True,
                    **kw):
    from transformers import InternVLConfig

    text = text_config(vocab_size, ids, **kw)
    vision = dict(hidden_size=vision_embed_dim, num_hidden_layers=vision_depth, num_attention_heads=vision_num_heads,
                  intermediate_size=vision_intermediate_size or 2 * vision_embed_dim,
                  image_size=[image_size, image_size], patch_size=[patch_size, patch_size],
                  attention_bias=attention_bias, use_qk_norm=use_qk_norm, norm_type=norm_type,
                  use_mean_pooling=use_mean_pooling, initializer_range=text["initializer_range"])
    return InternVLConfig(vision_config=vision, text_config=dict(model_type="qwen2", **text),
                          image_token_id=ids["image"], image_seq_length=(image_size // patch_size) ** 2 // 4,
                          vision_feature_layer=vision_feature_layer, tie_word_embeddings=text["tie_word_embeddings"])


def got_ocr2_image_processor(image_size: int = 32, max_patches: int = 6):
    from transformers import GotOcr2ImageProcessor

    return GotOcr2ImageProcessor(size={"height": image_size, "width": image_size}, max_patches=max_patches)


INTERNVL_NAMED_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

INTERNVL = TinyFamily(
    "internvl", "InternVLForConditionalGeneration",
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
    eos="<|im_end|>", pad="<|endoftext|>", bos="<|endoftext|>", image_token="<IMG_CONTEXT>",
    chat_template=INTERNVL_CHAT_TEMPLATE, image_prompt="<IMG_CONTEXT>", video_prompt="<video>",
    vision=("vision_tower", ("projection", "q_proj", "k_proj", "v_proj", "projection_layer", "fc1", "fc2")),
    projector=("multi_modal_projector", ("linear_1", "linear_2")), config=internvl_config,
    image_processor=got_ocr2_image_processor, image_knobs=frozenset({"image_size", "max_patches"}),
    shared_knobs=frozenset({"image_size"}), named_tokens=INTERNVL_NAMED_TOKENS,
)

FAMILIES: dict[str, TinyFamily] = {f.name: f for f in (QWEN2_VL, QWEN2_5_VL, LLAVA, INTERNVL)}
