"""Matrices whose rows start on 16-byte boundaries, whatever their width.

cuBLAS runs its fastest GEMM kernels (TMA, 16-byte vector loads) only when every operand's leading dimension is a
multiple of 16 bytes; a bf16 matrix 3,420 wide (Qwen2.5-VL's ViT MLP: 6,840 bytes a row) falls back to kernels for
8-byte alignment. `aligned_empty` allocates such a matrix with its rows padded to the next 16 bytes and returns the
[.., cols] view: the same shape to every reader, a leading dimension cuBLAS takes without a copy (PyTorch passes a
row stride >= the width straight through), and the padding is never read. Widths that are already aligned get a
plain contiguous tensor.
"""

from __future__ import annotations

import torch

ALIGN_BYTES = 16


def aligned_empty(shape: tuple[int, ...], dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """torch.empty(shape) whose last-dim rows each start at a multiple of ALIGN_BYTES (a view of a wider tensor)."""
    dtype = dtype or torch.get_default_dtype()
    per = max(1, ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    cols = shape[-1]
    padded = -(-cols // per) * per
    if padded == cols:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty((*shape[:-1], padded), dtype=dtype, device=device)[..., :cols]
