"""`lora_matmul`: the one operator through which all LoRA arithmetic goes, with swappable backends.

    lora_matmul(x, ids, stack_a, stack_b, ranks, scalings, backend) -> delta
      x        [T, K]           activations
      ids      [T] int          adapter slot per token, -1 = no adapter (delta row is zero)
      stack_a  [N, S*R, K]      A of each slot; slice j uses rows [j*R, j*R + ranks[j][n]) (rest ignored)
      stack_b  [N, sum(W), R]   B of each slot; slice j owns output rows [off_j, off_j + W_j)
      ranks    [N] or [S, N]    true rank of each slot (per slice; 0 = slice not targeted by that adapter)
      scalings [N] float        lora_alpha / r (or rsLoRA) of each slot
    delta[t] = scalings[n] * x[t] @ A[n].T @ B[n].T with n = ids[t], per output slice.

Fused projections (qkv, gate/up) pass `slices=(W_q, W_k, W_v)`; `out=` accumulates into an existing output
so no extra pass over it is paid. `meta` (built once per step) replaces `ids`.

Backends: `atmm` (Triton, tiles tuned per shape; the default on GPU), `sgmv` and `bgmv` (Triton baselines in the
Punica/S-LoRA style), `gather` (per-token weights + bmm) and `torch` (the reference). See docs/kernels.md.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence

import torch

from valora.lora.ops.gather import lora_gather
from valora.lora.ops.meta import LoRAMeta
from valora.lora.ops.torch_ref import lora_torch

Backend = Callable[..., None]


def _lazy(name: str, target: str) -> Backend:
    """A backend whose module is imported on first use: Triton kernels must be defined after the process has
    chosen between the GPU and the interpreter (TRITON_INTERPRET), not when this package is imported."""
    module, attr = target.split(":")

    def run(*args) -> None:
        BACKENDS[name] = getattr(importlib.import_module(module), attr)
        BACKENDS[name](*args)

    return run


BACKENDS: dict[str, Backend] = {
    "torch": lora_torch,
    "gather": lora_gather,
    "atmm": _lazy("atmm", "valora.lora.ops.atmm:lora_atmm"),
    "sgmv": _lazy("sgmv", "valora.lora.ops.sgmv:lora_sgmv"),
    "bgmv": _lazy("bgmv", "valora.lora.ops.bgmv:lora_bgmv"),
}


def default_backend(device: torch.device | str) -> str:
    """`atmm` on CUDA devices when Triton is installed, else the `torch` reference."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "atmm"
    return "torch"


def lora_matmul(
    x: torch.Tensor,
    ids: torch.Tensor | Sequence[int] | None,
    stack_a: torch.Tensor,
    stack_b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    backend: str | None = None,
    *,
    slices: Sequence[int] | None = None,
    out: torch.Tensor | None = None,
    meta: LoRAMeta | None = None,
) -> torch.Tensor:
    if meta is None:
        if ids is None:
            raise ValueError("lora_matmul needs `ids` or `meta`")
        meta = LoRAMeta.build(ids, device=x.device)
    if meta.num_tokens != x.shape[0]:
        raise ValueError(f"meta covers {meta.num_tokens} tokens but x has {x.shape[0]}")
    slices = tuple(slices) if slices is not None else (stack_b.shape[1],)
    if sum(slices) != stack_b.shape[1]:
        raise ValueError(f"slices {slices} do not add up to the B stack's width {stack_b.shape[1]}")
    if ranks.dim() == 1:
        ranks = ranks.unsqueeze(0)
    if ranks.shape[0] != len(slices):
        raise ValueError(f"ranks has {ranks.shape[0]} rows for {len(slices)} slices")
    if out is None:
        out = torch.zeros(x.shape[0], stack_b.shape[1], dtype=x.dtype, device=x.device)
    name = backend or default_backend(x.device)
    if name not in BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    if not meta.empty:
        BACKENDS[name](x, meta, stack_a, stack_b, ranks, scalings, slices, out)
    return out


__all__ = ["BACKENDS", "LoRAMeta", "default_backend", "lora_matmul"]
