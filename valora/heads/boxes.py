"""Boxes as fractions of the image size, [x1, y1, x2, y2]: their text form, overlap, and the training loss."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

GRID = 100  # text answers give corners as integers on a 0-100 grid: "(12,30),(55,71)"
_BOX = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)")


def format_box(box: Sequence[float]) -> str:
    x1, y1, x2, y2 = (min(GRID, max(0, round(v * GRID))) for v in box)
    return f"({x1},{y1}),({x2},{y2})"


def parse_box(text: str) -> list[float] | None:
    """The first "(x1,y1),(x2,y2)" in `text` as fractions, or None when there is none."""
    m = _BOX.search(text)
    return None if m is None else [int(v) / GRID for v in m.groups()]


def iou(a: Sequence[float] | None, b: Sequence[float]) -> float:
    """Intersection over union; 0 for a missing or empty box."""
    if a is None:
        return 0.0
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0.0, w) * max(0.0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 on the corners plus (1 - generalised IoU), as DETR trains its box head; both [B, 4] xyxy."""
    lt, rb = torch.maximum(pred[:, :2], target[:, :2]), torch.minimum(pred[:, 2:], target[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = lambda b: (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area(pred) + area(target) - inter
    hull = (torch.maximum(pred[:, 2:], target[:, 2:]) - torch.minimum(pred[:, :2], target[:, :2])).prod(-1)
    giou = inter / union.clamp(min=1e-6) - (hull - union) / hull.clamp(min=1e-6)
    return (pred - target).abs().sum(-1).mean() + (1 - giou).mean()
