"""The offline Python API, shaped like vLLM's: `LLM(model=...).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from valora.config import CacheConfig, EngineConfig, LoRAConfig, MultiModalConfig, SchedulerConfig
from valora.engine.inproc import InprocEngine
from valora.engine.input_processor import PromptType
from valora.lora.request import LoRARequest
from valora.multimodal.chat import MediaSources
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        *,
        tokenizer: str | None = None,
        enable_lora: bool = False,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        max_cpu_loras: int | None = None,
        lora_backend: str = "auto",
        dtype: str = "auto",
        device: str | None = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int | None = None,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        cpu_kv_cache_gb: float = 1.0,
        max_images_per_prompt: int = 8,
        embed_cache_mb: int = 512,
        allowed_media_domains: Sequence[str] = (),
        scheduler: str = "valora",
        max_wait_ms: float = 1000.0,
        enforce_eager: bool = False,
        mm_encoder_attn_backend: str = "auto",
        enable_chunked_prefill: bool = True,
        max_num_encoder_input_tokens: int | None = None,
        encoder_in_token_budget: bool = False,
        enable_prefix_caching: bool = True,
        async_scheduling: bool = True,
        step_log: str | None = None,
        tensor_parallel_size: int = 1,
    ) -> None:
        self.engine = InprocEngine(
            EngineConfig(
                model=model, tokenizer=tokenizer, dtype=dtype, device=device, seed=seed, max_model_len=max_model_len,
                enable_lora=enable_lora,
                lora=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras, lora_backend),
                cache=CacheConfig(block_size, num_kv_blocks, gpu_memory_utilization, cpu_kv_cache_gb,
                                  enable_prefix_caching),
                scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, policy=scheduler,
                                          max_wait_ms=max_wait_ms, enable_chunked_prefill=enable_chunked_prefill,
                                          max_num_encoder_input_tokens=max_num_encoder_input_tokens,
                                          encoder_in_token_budget=encoder_in_token_budget,
                                          async_scheduling=async_scheduling),
                multimodal=MultiModalConfig(max_images_per_prompt=max_images_per_prompt, embed_cache_mb=embed_cache_mb,
                                            allowed_media_domains=tuple(allowed_media_domains),
                                            mm_encoder_attn_backend=mm_encoder_attn_backend),
                enforce_eager=enforce_eager, step_log=step_log,
                tensor_parallel_size=tensor_parallel_size,
            )
        )
        self._counter = 0
        # Offline use runs in the caller's own process, so local image files are allowed anywhere.
        self.media = MediaSources.from_config(self.engine.core.config.multimodal, local_root="/")

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. Every prompt is checked before any runs, so a bad one fails the
        call without leaving the others half done."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        n = len(prompts)
        params = self._per_prompt(sampling_params or SamplingParams(), n, "sampling_params")
        loras = self._per_prompt(lora_request, n, "lora_request")
        for lora in {lr for lr in loras if lr is not None}:
            self.engine.core.add_lora(lora)
        ready = [self.engine.input_processor.process(p) for p in prompts]  # each prompt processed once
        ids = []
        for (text, processed), sp, lr in zip(ready, params, loras):
            rid = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_processed(rid, text, processed, sp, lr)
            ids.append(rid)
        return self._run(ids, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        allow_special_tokens: bool = False,
        media_io_kwargs: dict | None = None,
        continue_final_message: bool = False,
    ) -> list[RequestOutput]:
        """Applies the model's chat template (images and videos in content parts become the model's placeholders;
        `media_io_kwargs={"video": {"fps": ..., "num_frames": ...}}` samples the videos). Special-token strings in
        message text are tokenised as plain text unless `allow_special_tokens`. `continue_final_message` (with
        `add_generation_prompt=False`) continues the last message, a prefilled answer, as vLLM's `LLM.chat`."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.chat_prompt(c, chat_template, add_generation_prompt, allow_special_tokens, media_io_kwargs,
                                    continue_final_message) for c in conversations]
        return self.generate(prompts, sampling_params, lora_request, use_tqdm)

    def chat_prompt(self, messages: list[dict], chat_template: str | None = None, add_generation_prompt: bool = True,
                    allow_special_tokens: bool = False, media_io_kwargs: dict | None = None,
                    continue_final_message: bool = False) -> dict[str, Any]:
        return self.engine.input_processor.chat_prompt(messages, self.media, chat_template, add_generation_prompt,
                                                       allow_special_tokens, media_io_kwargs, continue_final_message)

    @staticmethod
    def _per_prompt(value, n: int, what: str) -> list:
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"{what} has {len(value)} entries for {n} prompts")
            return list(value)
        return [value] * n

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[i] for i in ids]
