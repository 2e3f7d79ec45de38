"""Model inputs built exactly as the server builds them: the chat template with one image whose placeholder is
expanded to the image's token count, the answer (if any) ending the assistant's turn. Only answer tokens carry
loss, so a model learns to reply, not to predict the question."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

IGNORE = -100


@dataclass(frozen=True)
class EncodedImage:
    pixels: torch.Tensor  # [patches, patch_dim] as the image processor returns them
    grid: torch.Tensor  # [3]: (frames, rows, columns) of patches
    num_tokens: int  # placeholder tokens it fills in the prompt


@dataclass(frozen=True)
class Row:
    """One training example: a prompt with one image, and the answer tokens (None: the row trains a head,
    which reads the hidden state of the prompt's last token, so the LM predicts nothing)."""

    prompt: list[int]
    image: EncodedImage
    answer: list[int] | None = None


class ChatEncoder:
    def __init__(self, model_dir: str | Path) -> None:
        from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.processor = AutoImageProcessor.from_pretrained(model_dir)
        self.image_token_id = config.image_token_id
        self.merge = config.vision_config.spatial_merge_size
        self.eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad = self.tokenizer.pad_token_id
        self.prompt_ids = cache(self._prompt_ids)

    def images(self, images: Sequence, chunk: int = 512) -> list[EncodedImage]:
        """Run the image processor once per `chunk` images (PIL, RGB)."""
        out: list[EncodedImage] = []
        for start in range(0, len(images), chunk):
            p = self.processor(images=list(images[start : start + chunk]), return_tensors="pt")
            grids = p["image_grid_thw"]
            for pixels, grid in zip(p["pixel_values"].split(grids.prod(-1).tolist()), grids):
                out.append(EncodedImage(pixels, grid, int(grid.prod()) // self.merge**2))
        return out

    def _prompt_ids(self, question: str, num_image_tokens: int) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        pad = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        return self.tokenizer(text.replace(pad, pad * num_image_tokens), add_special_tokens=False)["input_ids"]

    def answer_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.eos]

    def row(self, question: str, image: EncodedImage, answer: str | None = None) -> Row:
        return Row(self.prompt_ids(question, image.num_tokens), image,
                   None if answer is None else self.answer_ids(answer))

    def batch(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        """Right-padded HF inputs; `labels` hold the answer tokens only."""
        seqs = [r.prompt + (r.answer or []) for r in rows]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(rows), width), self.pad)
        target = torch.full((len(rows), width), IGNORE)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (row, seq) in enumerate(zip(rows, seqs)):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
            if row.answer:
                target[i, len(row.prompt) : len(seq)] = torch.tensor(row.answer)
        return {
            "input_ids": ids, "attention_mask": mask, "labels": target,
            "pixel_values": torch.cat([r.image.pixels for r in rows]),
            "image_grid_thw": torch.stack([r.image.grid for r in rows]),
            "mm_token_type_ids": (ids == self.image_token_id).int(),
        }
