"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with RMSNorm and SwiGLU MLPs in its ViT, and
windowed attention: most blocks attend within windows of `window_size` pixels (merge units reordered window by
window), the `fullatt_block_indexes` blocks over the whole image. Prompts, M-RoPE and the LM are Qwen2-VL's.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from torch import nn

from valora.models.layers.mlp import GatedMLP
from valora.models.layers.norm import RMSNorm
from valora.models.qwen2_vl import Qwen2VisionTower, Qwen2VLForConditionalGeneration, VisionBlock


@functools.lru_cache(maxsize=1024)
def window_layout(t: int, h: int, w: int, merge: int, window: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """The merge units of a (t, h, w) grid window by window (row-major windows of `window` x `window` units,
    row-major units inside, ragged at the edges), as transformers' `get_vision_window_index` orders them, and each
    window's size in patches."""
    gh, gw = h // merge, w // merge
    index = np.arange(t * gh * gw).reshape(t, gh, gw)
    ph, pw = -gh % window, -gw % window
    padded = np.pad(index, ((0, 0), (0, ph), (0, pw)), constant_values=-1)
    nh, nw = (gh + ph) // window, (gw + pw) // window
    padded = padded.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4).reshape(-1, window * window)
    counts = (padded >= 0).sum(1)
    return padded[padded >= 0], tuple(int(c) * merge**2 for c in counts[counts > 0])


class Qwen2_5VisionTower(Qwen2VisionTower):
    norm = RMSNorm

    def __init__(self, vc) -> None:
        super().__init__(vc, vc.hidden_size, vc.out_hidden_size)
        self.window = vc.window_size // vc.spatial_merge_size // vc.patch_size  # in merge units
        full = set(vc.fullatt_block_indexes)
        self.block_layout = [0 if i in full else 1 for i in range(vc.depth)]

    @classmethod
    def from_config(cls, vc) -> Qwen2_5VisionTower:
        return cls(vc)

    def make_block(self, vc) -> nn.Module:
        mlp = GatedMLP(self.width, vc.intermediate_size, vc.hidden_act, bias=True)
        return VisionBlock(self.width, vc.num_heads, mlp, self.norm)

    def layout(self, grids: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[list[int]]]:
        """Merge units window by window; layout 0: whole frames (the full-attention blocks), 1: windows."""
        order, windows, base = [], [], 0
        for t, h, w in grids:
            units, sizes = window_layout(t, h, w, self.merge, self.window)
            order.append(units + base)
            windows.extend(sizes)
            base += t * h * w // self.merge**2
        frames = [h * w for t, h, w in grids for _ in range(t)]
        return np.concatenate(order) if order else np.zeros(0, dtype=np.int64), [frames, windows]


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    tower = Qwen2_5VisionTower
