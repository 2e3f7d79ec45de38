"""The real peer: transformers (+ peft) `generate` on the same checkpoint, adapters and preprocessed inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from valora.multimodal.inputs import ProcessedPrompt


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
        ids = torch.tensor([prompt.token_ids], device=self.device)
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if prompt.images:
            kw["pixel_values"] = torch.cat([i.data["pixel_values"] for i in prompt.images]).to(self.device)
            kw["image_grid_thw"] = torch.cat([i.data["image_grid_thw"] for i in prompt.images]).to(self.device)
            kw["mm_token_type_ids"] = (ids == self.base.config.image_token_id).int()
        return kw

    @torch.no_grad()
    def generate(self, prompt: ProcessedPrompt, adapter_dir: str | None, max_new_tokens: int) -> Reference:
        kw = self.inputs(prompt)
        out = self.model_for(adapter_dir).generate(
            **kw, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
        tokens = out.sequences[0, kw["input_ids"].shape[1] :].tolist()
        return Reference(tokens, [step[0].float().log_softmax(-1).cpu() for step in out.logits])
