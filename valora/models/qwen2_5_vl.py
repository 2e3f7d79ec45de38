"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): Qwen2-VL with RMSNorm and SwiGLU MLPs in its ViT, and
windowed attention: most blocks attend within windows of `window_size` pixels (merge units reordered window by
window), the `fullatt_block_indexes` blocks over the whole image. Prompts, M-RoPE and the LM are Qwen2-VL's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from valora.models.layers.mlp import GatedMLP
from valora.models.layers.norm import RMSNorm
from valora.models.qwen2_vl import Qwen2VisionTower, Qwen2VLForConditionalGeneration, VisionBlock


class Qwen2_5VisionTower(Qwen2VisionTower):
    norm = RMSNorm

    def __init__(self, vc) -> None:
        super().__init__(vc, vc.hidden_size, vc.out_hidden_size)
        self.window = vc.window_size // vc.spatial_merge_size // vc.patch_size  # in merge units
        self.full_attention = set(vc.fullatt_block_indexes)

    @classmethod
    def from_config(cls, vc) -> Qwen2_5VisionTower:
        return cls(vc)

    def make_block(self, vc) -> nn.Module:
        mlp = GatedMLP(self.width, vc.intermediate_size, vc.hidden_act, bias=True)
        return VisionBlock(self.width, vc.num_heads, mlp, self.norm)

    def layout(self, grids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, list[list[int]]]:
        """Merge units window by window (row-major windows, row-major units inside, ragged at the edges), as
        transformers' `get_vision_window_index` orders them."""
        order, windows, base, w = [], [], 0, self.window
        for t, h, wd in grids:
            gh, gw = h // self.merge, wd // self.merge
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            ph, pw = -gh % w, -gw % w
            padded = F.pad(index, (0, pw, 0, ph), value=-1)
            nh, nw = (gh + ph) // w, (gw + pw) // w
            padded = padded.view(t, nh, w, nw, w).permute(0, 1, 3, 2, 4).reshape(-1, w * w)
            for window in padded:
                units = window[window >= 0]
                if units.numel():
                    order.append(units + base)
                    windows.append(units.numel() * self.merge**2)
            base += t * gh * gw
        frames = [h * wd for t, h, wd in grids for _ in range(t)]
        spans = [frames if i in self.full_attention else windows for i in range(len(self.blocks))]
        return torch.cat(order), spans


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    tower = Qwen2_5VisionTower
