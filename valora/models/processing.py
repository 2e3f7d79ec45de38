"""Prompt preprocessing shared by the families: image and video placeholders expanded as each family's HF
processor does.

A prompt marks each image (and video) with one placeholder token (the chat template writes it). Its tensors are
what the checkpoint's own image processor would give (its settings are read from the model directory), made by the
family's processor from the tensor ops of `valora.multimodal.pixels`, and the placeholder becomes runs of
placeholder tokens, the rows their embeddings fill: `image_start + placeholder * num_tokens + image_end` for an
image; for a video, one run of the video token (Qwen2-VL's temporal patches) or a run per frame, as an image, in
the family's own frame text (InternVL). Token-id prompts may carry a single placeholder per item (expanded here)
or the already expanded run (kept).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from valora.multimodal.inputs import ImageItem, InputError, ProcessedPrompt
from valora.multimodal.pixels import PixelNormalizer, content_hash
from valora.multimodal.video import Video


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


def video_settings(model_dir: str | Path) -> dict:
    """The checkpoint's video processor settings where transformers looks for them: `processor_config.json`'s
    "video_processor", then `video_preprocessor_config.json`, then `preprocessor_config.json` (checkpoints with one
    file for both). Read as JSON: transformers' video processors need torchvision."""
    model_dir = Path(model_dir)
    nested = model_dir / "processor_config.json"
    if nested.is_file() and isinstance(video := json.loads(nested.read_text()).get("video_processor"), dict):
        return video
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (model_dir / name).is_file():
            return json.loads((model_dir / name).read_text())
    return {}


@dataclass
class Run:
    """One run of placeholder tokens in a prompt: `num_tokens` copies of `token_id`, filled by the embeddings of
    `data` (the HF model's tensors for an image, a frame or a video)."""

    token_id: int
    data: dict[str, torch.Tensor]
    num_tokens: int
    content_hash: str


class ImagePromptProcessor:
    """Subclasses name their placeholders and implement `image_pixels`, `pixel_tensors` and `num_tokens`; families
    that take videos set `video_token` and implement `video_runs` (and `video_text` where frames carry text); M-RoPE
    families also override `positions`."""

    image_start = ""  # text the processor puts around each expanded run (InternVL's <img> ... </img>)
    image_end = ""
    video_token: str | None = None  # a video's placeholder in text prompts; None: the family takes no videos

    def __init__(self, model_dir: str | Path, tokenizer, image_token_id: int,
                 video_token_id: int | None = None) -> None:
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
        self.video_token_id = video_token_id  # a video's placeholder in token-id prompts (one run per video)
        self._start_ids = self._ids(self.image_start)
        self._end_ids = self._ids(self.image_end)
        ensure_chat_template(model_dir, tokenizer)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def image_pixels(self, image: Image.Image) -> torch.Tensor:
        """The uint8 pixels the model's tensors are made of: the RGB image resized, padded, cropped or tiled as the
        checkpoint's image processor does ([..., H, W, 3]); the image's identity for the caches."""
        raise NotImplementedError

    def pixel_tensors(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`image_pixels`' result laid out as the HF model takes it, still uint8, with the table that rescales and
        normalises it on the model's device (`PixelNormalizer.tensors`)."""
        raise NotImplementedError

    def image_tensors(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """What the checkpoint's image processor gives for this one RGB image, its pixels uint8 beside their table
        (`multimodal.pixels.hf_tensors` gives the processor's float32)."""
        return self.pixel_tensors(self.image_pixels(image))

    def num_tokens(self, data: dict[str, torch.Tensor]) -> int:
        """Placeholder tokens (= embeddings) of one image."""
        raise NotImplementedError

    def video_runs(self, video: Video) -> list[Run]:
        """The placeholder runs of one video, in prompt order."""
        raise InputError(f"{type(self).__name__.removesuffix('InputProcessor')} takes no videos; send the frames as "
                         "images")

    def video_text(self, runs: Sequence[Run]) -> str:
        """The text that replaces a video's placeholder: its runs, back to back."""
        return "".join(self.run_text(r) for r in runs)

    def run_text(self, run: Run) -> str:
        token = self.image_token if run.token_id == self.image_token_id else self.video_token
        return self.image_start + token * run.num_tokens + self.image_end

    def positions(self, length: int, items: Sequence[ImageItem]) -> tuple[torch.Tensor | None, int]:
        """Prompt positions ([3, L] for M-RoPE) and the offset of generated tokens; None = plain 0..L-1."""
        return None, 0

    def image_run(self, image: Image.Image) -> Run:
        pixels = self.image_pixels(image)
        data = self.pixel_tensors(pixels)
        return Run(self.image_token_id, data, self.num_tokens(data), content_hash(self.hash_key, pixels))

    def __call__(self, prompt: str | Sequence[int], images: Sequence[Image.Image],
                 videos: Sequence[Video] = ()) -> ProcessedPrompt:
        try:
            image_runs = [self.image_run(image) for image in images]
            video_runs = [self.video_runs(video) for video in videos]
        except InputError:
            raise
        except ValueError as e:  # `load_image` checks what the families refuse; a processor may still refuse more
            raise InputError(f"the image processor refused an image: {e}") from e
        expand = self._expand_text if isinstance(prompt, str) else self._expand_ids
        ids, runs = expand(prompt, image_runs, video_runs)
        items, pos = [], 0
        for run in runs:
            pos = ids.index(run.token_id, pos)
            items.append(ImageItem(run.data, run.num_tokens, pos, run.content_hash))
            pos += run.num_tokens
        positions, delta = self.positions(len(ids), items)
        return ProcessedPrompt(ids, items, positions, delta)

    def _expand_text(self, prompt: str, image_runs: list[Run],
                     video_runs: list[list[Run]]) -> tuple[list[int], list[Run]]:
        if not prompt:
            raise InputError("prompt is empty")  # even where the tokenizer would give it a BOS
        markers = [self.image_token] + ([self.video_token] if self.video_token else [])
        pieces = re.split("(" + "|".join(map(re.escape, markers)) + ")", prompt)
        found = pieces[1::2]
        for marker, given, what in ((self.image_token, image_runs, "image"), (self.video_token, video_runs, "video")):
            n = found.count(marker) if marker else 0
            if n != len(given):
                raise InputError(f"prompt has {n} {what} placeholders ({marker}) but {len(given)} {what}s")
        images, videos = iter(image_runs), iter(video_runs)
        text, runs = [pieces[0]], []
        for marker, after in zip(found, pieces[2::2]):
            if marker == self.image_token:
                runs.append(next(images))
                text.append(self.run_text(runs[-1]))
            else:
                video = next(videos)
                runs += video
                text.append(self.video_text(video))
            text.append(after)
        # Tokenised as the HF processor does, with the tokenizer's own special tokens (Llama's BOS, say).
        return self.tokenizer("".join(text))["input_ids"], runs

    def _expand_ids(self, ids: Sequence[int], image_runs: list[Run],
                    video_runs: list[list[Run]]) -> tuple[list[int], list[Run]]:
        queues = {self.image_token_id: ("image", image_runs)}
        if video_runs:
            if self.video_token_id is None:
                raise InputError("this model takes videos in text prompts only (the frames' text is its own)")
            queues[self.video_token_id] = ("video", [runs[0] for runs in video_runs])
        used = dict.fromkeys(queues, 0)
        out, runs, i = [], [], 0
        while i < len(ids):
            token = ids[i]
            if token not in queues:
                out.append(token)
                i += 1
                continue
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            what, queue = queues[token]
            if used[token] >= len(queue):
                raise InputError(f"prompt has more {what} placeholders than {what}s")
            run = queue[used[token]]
            if j - i == 1 and run.num_tokens != 1:
                out.extend(self._start_ids + [token] * run.num_tokens + self._end_ids)
            elif j - i == run.num_tokens:
                out.extend(ids[i:j])
            else:
                raise InputError(f"{what} {used[token]} needs 1 or {run.num_tokens} placeholder tokens, got {j - i}")
            runs.append(run)
            used[token] += 1
            i = j
        for token, (what, queue) in queues.items():
            if used[token] != len(queue):
                raise InputError(f"prompt has {used[token]} {what} placeholders but {len(queue)} {what}s")
        return out, runs
