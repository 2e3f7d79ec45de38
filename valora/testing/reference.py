"""The real peer: transformers (+ peft) `generate` on the same checkpoint, adapters and preprocessed inputs."""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from valora.multimodal.inputs import ProcessedPrompt
from valora.multimodal.pixels import hf_tensors


def hf_inputs(model, prompt: ProcessedPrompt, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The HF model's keyword inputs for one prompt: the ids, and each image (and video) tensor the processor
    made, concatenated over the items that have it as the family's HF processor batches them (plus Qwen's token
    types where the model takes them: 1 for image tokens, 2 for video tokens)."""
    ids = torch.tensor([prompt.token_ids], device=device)
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if prompt.images:
        items = [hf_tensors(i.data) for i in prompt.images]
        for key in dict.fromkeys(k for i in items for k in i):
            kw[key] = torch.cat([i[key] for i in items if key in i]).to(device)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
            types = (ids == model.config.image_token_id).int()
            if getattr(model.config, "video_token_id", None) is not None:
                types += 2 * (ids == model.config.video_token_id).int()
            kw["mm_token_type_ids"] = types
    return kw


@dataclass
class Reference:
    token_ids: list[int]
    logprobs: list[torch.Tensor]  # per step, [V] log-softmax of the raw logits


class HFReference:
    """Holds one base model and a PEFT wrapper per adapter directory (built on first use)."""

    def __init__(self, model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        from transformers import AutoModelForImageTextToText

        self.base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        self._peft: dict[str, torch.nn.Module] = {}

    def model_for(self, adapter_dir: str | None):
        if adapter_dir is None:
            return self.base
        if adapter_dir not in self._peft:
            from peft import PeftModel

            self._peft[adapter_dir] = PeftModel.from_pretrained(copy.deepcopy(self.base), adapter_dir).eval()
        return self._peft[adapter_dir]

    def inputs(self, prompt: ProcessedPrompt) -> dict[str, torch.Tensor]:
        return hf_inputs(self.base, prompt, self.device)

    @torch.no_grad()
    def generate(self, prompt: ProcessedPrompt, adapter_dir: str | None, max_new_tokens: int) -> Reference:
        """Greedy decoding for exactly `max_new_tokens`, EOS neither stopping nor suppressed (the engine's
        `ignore_eos`; `min_new_tokens` would mask EOS instead)."""
        kw = self.inputs(prompt)
        out = self.model_for(adapter_dir).generate(
            **kw, max_new_tokens=max_new_tokens, eos_token_id=[], do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
        tokens = out.sequences[0, kw["input_ids"].shape[1] :].tolist()
        return Reference(tokens, [step[0].float().log_softmax(-1).cpu() for step in out.logits])
