"""Prompt preprocessing shared by the families: image placeholders expanded as each family's HF processor does.

A prompt marks each image with one placeholder token (the chat template writes it). Its image's tensors are what
the checkpoint's own image processor would give (its settings are read from the model directory), made by the
family's processor from the tensor ops of `valora.multimodal.pixels`, and the placeholder becomes
`image_start + placeholder * num_tokens + image_end`, the run of rows its embeddings fill. Token-id prompts may
carry a single placeholder per image (expanded here) or the already expanded run (kept).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from valora.multimodal.inputs import ImageItem, InputError, ProcessedPrompt
from valora.multimodal.pixels import PixelNormalizer, content_hash


def ensure_chat_template(model_dir: str | Path, tokenizer) -> None:
    """Processor-side chat templates (`chat_template.json`, or `processor_config.json`'s entry, as many LMM
    checkpoints ship them) are not read by `AutoTokenizer`; adopt one when the tokenizer has none."""
    if tokenizer.chat_template is not None:
        return
    for name in ("chat_template.json", "processor_config.json"):
        path = Path(model_dir) / name
        if path.is_file():
            template = json.loads(path.read_text()).get("chat_template")
            if template:
                tokenizer.chat_template = template
                return


class ImagePromptProcessor:
    """Subclasses name their placeholder and implement `image_tensors` and `num_tokens`; M-RoPE families also
    override `positions`."""

    image_start = ""  # text the processor puts around each expanded run (InternVL's <img> ... </img>)
    image_end = ""

    def __init__(self, model_dir: str | Path, tokenizer, image_token_id: int) -> None:
        from transformers import AutoImageProcessor

        self.tokenizer = tokenizer
        # The checkpoint's image processor settings, resolved by transformers (legacy keys, class defaults); its
        # PIL backend is the reference our tensors equal, whatever backends this host has.
        self.config = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
        self.normalize = PixelNormalizer.from_hf(self.config)
        self.resample = int(self.config.resample)
        self.hash_key = json.dumps([type(self).__name__, self.config.to_dict()], sort_keys=True, default=str).encode()
        self.image_token_id = image_token_id
        self.image_token = tokenizer.convert_ids_to_tokens(image_token_id)
        self._start_ids = self._ids(self.image_start)
        self._end_ids = self._ids(self.image_end)
        ensure_chat_template(model_dir, tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def image_tensors(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """What the checkpoint's image processor gives for this one RGB image, as the HF model takes it."""
        raise NotImplementedError

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        """Placeholder tokens (= embeddings) of one image."""
        raise NotImplementedError

    def positions(self, length: int, items: Sequence[ImageItem]) -> tuple[torch.Tensor | None, int]:
        """Prompt positions ([3, L] for M-RoPE) and the offset of generated tokens; None = plain 0..L-1."""
        return None, 0

    def __call__(self, prompt: str | Sequence[int], images: Sequence) -> ProcessedPrompt:
        try:
            data = [self.image_tensors(image) for image in images]
        except ValueError as e:  # `load_image` checks what the families refuse; a processor may still refuse more
            raise InputError(f"the image processor refused an image: {e}") from e
        counts = [self.num_tokens(d) for d in data]
        ids = self._expand_text(prompt, counts) if isinstance(prompt, str) else self._expand_ids(list(prompt), counts)
        items, pos = [], 0
        for image, d, c in zip(images, data, counts):
            pos = ids.index(self.image_token_id, pos)
            items.append(ImageItem(d, c, pos, content_hash(self.hash_key, [image])))
            pos += c
        positions, delta = self.positions(len(ids), items)
        return ProcessedPrompt(ids, items, positions, delta)

    def _expand_text(self, prompt: str, counts: list[int]) -> list[int]:
        if not prompt:
            raise InputError("prompt is empty")  # even where the tokenizer would give it a BOS
        n = prompt.count(self.image_token)
        if n != len(counts):
            raise InputError(f"prompt has {n} image placeholders ({self.image_token}) but {len(counts)} images")
        parts = prompt.split(self.image_token)
        text = parts[0] + "".join(
            self.image_start + self.image_token * c + self.image_end + p for c, p in zip(counts, parts[1:])
        )
        # Tokenised as the HF processor does, with the tokenizer's own special tokens (Llama's BOS, say).
        return self.tokenizer(text)["input_ids"]

    def _expand_ids(self, ids: list[int], counts: list[int]) -> list[int]:
        runs, out, i = 0, [], 0
        while i < len(ids):
            if ids[i] != self.image_token_id:
                out.append(ids[i])
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == self.image_token_id:
                j += 1
            if runs >= len(counts):
                raise InputError("prompt has more image placeholders than images")
            if j - i == 1 and counts[runs] != 1:
                out.extend(self._start_ids + [self.image_token_id] * counts[runs] + self._end_ids)
            elif j - i == counts[runs]:
                out.extend(ids[i:j])
            else:
                raise InputError(f"image {runs} needs 1 or {counts[runs]} placeholder tokens, got {j - i}")
            runs, i = runs + 1, j
        if runs != len(counts):
            raise InputError(f"prompt has {runs} image placeholders but {len(counts)} images")
        return out
