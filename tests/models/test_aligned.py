"""Rows on 16-byte boundaries (models/layers/aligned.py): a LoRALinear whose input width is not a multiple of 16
bytes (Qwen2.5-VL's ViT down projection, 3420 in bf16) keeps its shape for loading, adapters and merging while its
weight rows, and its merged copy's, start 16 bytes apart; the GEMM reads the padded rows without a copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from valora.models.layers.aligned import aligned_empty
from valora.models.layers.linear import LoRALinear


@pytest.mark.parametrize("dtype,cols,stride", [(torch.bfloat16, 3420, 3424), (torch.float16, 36, 40),
                                               (torch.float32, 3420, 3420), (torch.bfloat16, 1280, 1280)])
def test_rows_padded_to_16_bytes(dtype, cols, stride):
    t = aligned_empty((5, cols), dtype)
    assert t.shape == (5, cols) and t.stride() == (stride, 1)
    assert aligned_empty((2, 3, cols), dtype).stride()[-2:] == (stride, 1)


def test_layer_with_padded_rows_computes_as_a_dense_one():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # as the engine builds models: in their dtype
    try:
        layer = LoRALinear(36, 24, bias=True)
    finally:
        torch.set_default_dtype(default)
    w, b = torch.randn(24, 36).half(), torch.randn(24).half()
    layer.load_weight("weight", w)
    layer.load_weight("bias", b)
    assert layer.weight.stride() == (40, 1) and torch.equal(layer.weight, w)
    x = torch.randn(7, 36).half()
    torch.testing.assert_close(layer(x), F.linear(x, w, b), atol=0, rtol=0)
    layer.reserve_merged()
    assert layer.merged_weight.shape == w.shape and layer.merged_weight.stride() == (40, 1)
