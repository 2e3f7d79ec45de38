"""`InputProcessor`: a request as a client gives it -> the `EngineCoreRequest`s the engine core runs.

Everything about a prompt happens here, once, before the core sees it: the prompt's form, chat messages and the
chat template, image and video loading under the limits, the family's processor (tensors, each item's content
hash, placeholder expansion, M-RoPE positions), token-id checks, and the context length. The server's front
end and the offline `LLM` run this same code; the core never tokenises and never runs an image processor.
Calls keep no state between them, so a front end runs many requests at once on a thread pool.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from valora.config import EngineConfig
from valora.engine.request import EngineCoreRequest
from valora.engine.structured_outputs import GrammarCompiler
from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.models.registry import resolve_family
from valora.multimodal.chat import MediaSources, chat_media, parse_messages
from valora.multimodal.inputs import InputError, ProcessedPrompt, load_image, lone_surrogate
from valora.multimodal.template import render_chat
from valora.multimodal.video import as_videos, load_video, video_sampling
from valora.sampling_params import SamplingParams

PromptType = str | dict[str, Any]


class InputProcessor:
    def __init__(self, config: EngineConfig, max_model_len: int) -> None:
        """`max_model_len` is the engine core's (it may be lower than the model's, when the KV cache is small)."""
        from transformers import AutoConfig, AutoTokenizer

        model_dir = Path(config.model)
        hf_config = AutoConfig.from_pretrained(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or model_dir)
        self.processor = resolve_family(hf_config).processor_cls(model_dir, hf_config, self.tokenizer)
        self.vocab_size = getattr(hf_config, "text_config", hf_config).vocab_size
        self.eos_token_ids = frozenset(eos_token_ids(model_dir, self.tokenizer))
        # a grammar is compiled here too (cached), so a bad one is refused before the core sees the request
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        self.limits = config.multimodal
        self.max_model_len = max_model_len

    def chat_prompt(self, messages: list[dict], media: MediaSources, chat_template: str | None = None,
                    add_generation_prompt: bool = True, allow_special_tokens: bool = False,
                    media_io_kwargs: dict | None = None, continue_final_message: bool = False) -> dict[str, Any]:
        """OpenAI-style messages -> a prompt dict through the model's chat template; special tokens typed in the
        messages stay text unless `allow_special_tokens`; `continue_final_message` continues the last message
        instead of opening a turn. Videos are decoded here (sampled by `media_io_kwargs`); images stay undecoded:
        `process` loads them under the limits."""
        try:
            template_messages, images, videos = parse_messages(messages, media, self.limits)
            template_messages, images, videos = chat_media(template_messages, images, videos, self.limits,
                                                           media_io_kwargs, self.processor.video_token is None)
        except InputError as e:  # malformed messages, or media that cannot be used (a MediaError says which)
            raise InputError(str(e), e.code or "invalid_messages", "messages") from e
        try:
            prompt = render_chat(self.tokenizer, template_messages, add_generation_prompt, chat_template,
                                 allow_special_tokens, continue_final_message)
        except InputError:
            raise
        except Exception as e:  # jinja raises many types for messages a template cannot render
            raise InputError(f"cannot apply the chat template: {e}", "invalid_messages", "messages") from e
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        return {key: prompt, "multi_modal_data": {"image": images, "video": videos}}

    def process(self, prompt: PromptType, max_tokens: int | None = None) -> tuple[str | None, ProcessedPrompt]:
        """The prompt's text (None for token ids) and its ready form. With `max_tokens`, prompt plus output must
        fit the context length (the server's rule); without, the prompt alone must."""
        images: list = []
        videos: list = []
        limits = self.limits
        if isinstance(prompt, str):
            text, ids = prompt, None
        elif isinstance(prompt, dict):
            text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
            if (text is None) == (ids is None):
                raise InputError("a prompt dict needs exactly one of 'prompt' or 'prompt_token_ids'")
            mm = prompt.get("multi_modal_data") or {}
            unknown = set(mm) - {"image", "video"}
            if unknown:
                raise InputError(f"unsupported multi_modal_data keys {sorted(unknown)} (only 'image' and 'video')")
            raw = mm.get("image", [])
            images = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            videos = as_videos(mm.get("video"))
            if len(videos) > limits.max_videos_per_prompt:
                raise InputError(f"{len(videos)} videos in one prompt, over the limit of "
                                 f"{limits.max_videos_per_prompt}", "too_many_videos", "messages")
            sampling = video_sampling(limits, prompt.get("media_io_kwargs"))
            try:
                videos = [load_video(v, limits, sampling) for v in videos]
            except InputError as e:
                raise InputError(str(e), e.code or "invalid_video", "messages") from e
        else:
            raise InputError(f"prompt must be a string or a dict, not {type(prompt).__name__}")
        if len(images) > limits.max_images_per_prompt:
            raise InputError(f"{len(images)} images in one request, over the limit of "
                             f"{limits.max_images_per_prompt}", "too_many_images", "messages")
        try:
            images = [load_image(img, limits) for img in images]
        except InputError as e:
            raise InputError(str(e), "invalid_image", "messages") from e
        if text is not None and (at := lone_surrogate(text)) is not None:  # a tokenizer's TypeError otherwise
            raise InputError(f"prompt is not Unicode text: a lone surrogate {text[at]!r} at character {at}")
        if ids is not None and not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in ids):
            raise InputError(f"prompt_token_ids must be integers in [0, {self.vocab_size})")
        processed = self.processor(text if ids is None else ids, images, videos)
        n, limit = len(processed.token_ids), self.max_model_len
        if n == 0:
            raise InputError("prompt is empty")
        if n >= limit:
            raise InputError(f"prompt has {n} tokens but the context length (max_model_len) is {limit}")
        if max_tokens is not None and n + max_tokens > limit:
            raise InputError(
                f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
                f"and your request has {n} input tokens ({max_tokens} > {limit} - {n})",
                "context_length_exceeded", "max_tokens")
        return text, processed

    def check_params(self, params: SamplingParams | HeadParams) -> None:
        """What of the decoding options only this model can judge: `logit_bias` ids within its vocabulary."""
        outside = sorted(t for t in getattr(params, "logit_bias", None) or {} if t >= self.vocab_size)
        if outside:
            raise InputError(f"logit_bias has token ids outside the vocabulary [0, {self.vocab_size}): "
                             f"{outside[:5]}", "invalid_value", "logit_bias")

    def core_requests(self, request_id: str, processed: ProcessedPrompt, params: SamplingParams | HeadParams,
                      lora: LoRARequest | None, arrival_time: float,
                      deadline_s: float | None = None) -> list[EngineCoreRequest]:
        """The core's requests for one prompt: one per completion (`n`), each with `n=1` and, when seeded, its own
        seed (`seed + i`, wrapped into int64 as torch's generators wrap it mod 2**64), so the core only ever runs
        single sequences."""
        if isinstance(params, HeadParams):
            return [EngineCoreRequest(child_id(request_id, 0), processed, params, lora, arrival_time, frozenset(),
                                      deadline_s)]
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        out = []
        for i in range(params.n):
            seed = None if params.seed is None else (params.seed + i + 2**63) % 2**64 - 2**63  # torch's seeds wrap
            child = dataclasses.replace(params, n=1, seed=seed) if params.n > 1 else params
            out.append(EngineCoreRequest(child_id(request_id, i), processed, child, lora, arrival_time, stops,
                                         deadline_s))
        return out


def child_id(request_id: str, index: int) -> str:
    """The core's id for completion `index` of a request."""
    return f"{request_id}#{index}"


def eos_token_ids(model_dir: Path, tokenizer) -> set[int]:
    """The ids that end generation: the generation config's EOS (one or several) and the tokenizer's."""
    ids: set[int] = set()
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        eos = None
    for e in eos if isinstance(eos, list) else [eos]:
        if e is not None:
            ids.add(int(e))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
