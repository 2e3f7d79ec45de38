"""The heads themselves, and where they read the LM: the final hidden state at the last real token."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from valora.heads.boxes import format_box
from valora.outputs import HeadOutput

HeadKind = Literal["classify", "box"]


@dataclass(frozen=True)
class HeadConfig:
    name: str
    kind: HeadKind
    hidden_size: int  # width of the LM hidden state it reads
    width: int = 256  # of its hidden layer
    labels: tuple[str, ...] = field(default_factory=tuple)  # classify: class names, in output order

    def __post_init__(self) -> None:
        if self.kind not in ("classify", "box"):
            raise ValueError(f"head {self.name!r}: kind must be 'classify' or 'box', not {self.kind!r}")
        if self.kind == "classify" and len(self.labels) < 2:
            raise ValueError(f"head {self.name!r}: a classification head needs at least two labels")
        if self.kind == "box" and self.labels:
            raise ValueError(f"head {self.name!r}: a box head has no labels")


class TaskHead(nn.Module):
    """Linear -> GELU -> Linear on one hidden state. Box heads predict (cx, cy, w, h) through a sigmoid, so every
    box they give is valid and inside the image."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        out = len(config.labels) if config.kind == "classify" else 4
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, config.width), nn.GELU(), nn.Linear(config.width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, hidden] -> class logits [B, C], or boxes [B, 4] as x1, y1, x2, y2 in [0, 1]."""
        out = self.mlp(hidden.to(self.mlp[0].weight.dtype))
        if self.config.kind == "classify":
            return out
        center, size = out.sigmoid().split(2, dim=-1)
        return torch.cat([(center - size / 2).clamp(0, 1), (center + size / 2).clamp(0, 1)], dim=-1)

    @torch.inference_mode()
    def answer(self, hidden: torch.Tensor) -> list[HeadOutput]:
        out = self(hidden).float().cpu()
        name = self.config.name
        if self.config.kind == "box":
            return [HeadOutput(name, format_box(b), box=b) for b in out.tolist()]
        probs = out.softmax(-1)
        labels = self.config.labels
        return [HeadOutput(name, labels[int(p.argmax())], scores=dict(zip(labels, p.tolist()))) for p in probs]


def pool_last(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] right-padded -> [B, H] at each row's last non-pad token (never a pad position)."""
    last = attention_mask.sum(-1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def answer_all(items: Sequence[tuple[TaskHead, torch.Tensor]]) -> list[HeadOutput]:
    """Answers for (head, hidden [H]) pairs in order, one batched call per distinct head."""
    groups: dict[int, list[int]] = {}
    for i, (head, _) in enumerate(items):
        groups.setdefault(id(head), []).append(i)
    answers: list[HeadOutput | None] = [None] * len(items)
    for rows in groups.values():
        head = items[rows[0]][0]
        for i, a in zip(rows, head.answer(torch.stack([items[i][1] for i in rows]))):
            answers[i] = a
    return answers
