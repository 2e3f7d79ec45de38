"""Train a tiny Qwen2-VL on digit images, then LoRA adapters that teach it new tasks on the same images.

Training runs on the Hugging Face model (and PEFT for adapters) through `valora.training`, so what is saved is
exactly the HF and PEFT format any user would bring; the server then loads it through VaLoRA's own engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from valora.demo.data import DigitSet
from valora.demo.tasks import Task, corpus
from valora.testing.checkpoints import build_qwen2_vl
from valora.training.encoder import ChatEncoder
from valora.training.loop import fit
from valora.training.specs import AdapterSpec, TrainSpec

__all__ = ["AdapterSpec", "ModelSpec", "TaskEncoder", "TrainSpec", "train_adapter", "train_base"]


@dataclass(frozen=True)
class ModelSpec:
    """The base model's size: about 1 M parameters, trained from scratch in well under a minute on 2 cores."""

    hidden_size: int = 128
    intermediate_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vision_depth: int = 2
    vision_embed_dim: int = 64
    vision_num_heads: int = 2
    tokenizer_vocab: int = 384  # enough that every question and answer word is one token
    image_size: int = 56


class TaskEncoder:
    """Digit-task batches: the dataset's images are processed once; each batch asks one task about some of them."""

    def __init__(self, model_dir: Path, images: list) -> None:
        self.chat = ChatEncoder(model_dir)
        self.images = self.chat.images(images)

    def batch(self, task: Task, indices: torch.Tensor, labels: list[int]) -> dict[str, torch.Tensor]:
        return self.chat.batch([self.chat.row(task.question, self.images[i], task.answer(labels[i]))
                                for i in indices.tolist()])


def sampler(encoder: TaskEncoder, task: Task, data: DigitSet, batch_size: int) -> Callable[[torch.Generator], dict]:
    def sample(gen: torch.Generator) -> dict:
        return encoder.batch(task, torch.randint(len(data), (batch_size,), generator=gen), data.labels)

    return sample


def train_base(out_dir: Path, data: DigitSet, task: Task, model: ModelSpec, spec: TrainSpec) -> Path:
    """A Qwen2-VL checkpoint trained from scratch to answer `task` (the tokenizer is trained on the demo's text)."""
    from transformers import Qwen2VLForConditionalGeneration

    side = model.image_size
    build_qwen2_vl(
        out_dir, seed=spec.seed, min_pixels=side * side, max_pixels=side * side,
        tokenizer_vocab=model.tokenizer_vocab, corpus=corpus() * 8,
        hidden_size=model.hidden_size, intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_hidden_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_key_value_heads, vision_depth=model.vision_depth,
        vision_embed_dim=model.vision_embed_dim, vision_num_heads=model.vision_num_heads,
        max_position_embeddings=512,
    )
    torch.manual_seed(spec.seed)
    hf = Qwen2VLForConditionalGeneration.from_pretrained(out_dir)
    encoder = TaskEncoder(out_dir, data.images)
    sample = sampler(encoder, task, data, spec.batch_size)
    fit(hf, lambda gen: hf(**sample(gen)).loss, spec, desc=f"base model ({task.summary})")
    hf.save_pretrained(out_dir)
    return out_dir


def train_adapter(base_dir: Path, out_dir: Path, data: DigitSet, task: Task, spec: AdapterSpec,
                  base_model: torch.nn.Module | None = None, encoder: TaskEncoder | None = None) -> Path:
    """A PEFT LoRA adapter over the frozen base that teaches `task`; pass `base_model` and `encoder` to reuse
    them across adapters (the base model is copied, never modified)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(spec.train.seed)
    base = base_model if base_model is not None else Qwen2VLForConditionalGeneration.from_pretrained(base_dir)
    encoder = encoder or TaskEncoder(base_dir, data.images)
    config = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=spec.target_modules)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    sample = sampler(encoder, task, data, spec.train.batch_size)
    fit(peft_model, lambda gen: peft_model(**sample(gen)).loss, spec.train, desc=f"adapter {task.name!r}")
    peft_model.save_pretrained(out_dir)
    return out_dir
