"""Build, before the first request, every LoRA kernel configuration a step can pick, so that no step pays for
Triton's JIT.

Which configuration a LoRA call runs depends on its shape (tokens that carry an adapter, distinct adapters, the
layer's widths: the tuned table or the heuristic, lora/tuning) and Triton specialises each on its integer
arguments and on the alignment of its metadata pointers. A fresh server met a new one at first use for minutes:
on the H100 the end-to-end sweep's `valora` server spent 46 s of its first two minutes in steps of 0.25-7 s,
mostly compiling (docs/benchmarks.md, run 3). The shapes a step can have are known at start-up: the decode graphs'
(batch bucket, adapter bucket) pairs, the token graphs' (token bucket, adapter bucket) pairs, each with its
one-adapter correction metadata (mixture mode), and the eager steps' exact layouts, which this samples a quarter
octave apart in tokens and in adapters. The merge kernel is built for every rank where the scheduler may merge.
The metadata is made by the same classes a step uses (`GraphLoRAMeta` for graphs, `LoRAMeta.build` eagerly), so
the pointers have the alignment a step's have, and each layer shape is compiled through its own layer's
`add_lora`: what is built is what a step will look up. On the H100 this took 17 s on a fresh machine and 2.5 s
with Triton's disk cache (584 layouts, Qwen2-VL-7B shapes, 16 adapter slots).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from valora.lora.ops.batch import LoRABatch
from valora.lora.ops.jit import compile_only
from valora.lora.ops.meta import LoRAMeta
from valora.models.layers.linear import LoRALinear

logger = logging.getLogger(__name__)

TRITON_BACKENDS = ("atmm", "sgmv")  # LoRA backends whose kernels honour compile_only()


def eager_sizes(max_tokens: int, max_loras: int) -> list[tuple[int, int]]:
    """(tokens with an adapter, distinct adapters) of eager steps, each a quarter octave apart (the tuned plans
    change at octave steps), from one to `max_tokens` and to `max_loras`."""
    tokens, adapters = _quarter_octaves(max_tokens), _quarter_octaves(max_loras)
    return [(t, a) for t in tokens for a in adapters if a <= t]


def _quarter_octaves(top: int) -> list[int]:
    values, i = {top}, 0
    while (v := round(2 ** (i / 4))) < top:
        values.add(v)
        i += 1
    return sorted(values)


def compile_lora_kernels(model: torch.nn.Module, graph_metas: Iterable[LoRAMeta], eager: Iterable[tuple[int, int]],
                         device: torch.device) -> int:
    """Compile the LoRA kernels of every language-model layer shape for the graphs' metadata `graph_metas` and
    eager batches of `eager` (tokens, distinct adapters), and the merge kernels; returns the number of layouts
    walked (0 where there is nothing to build: no adapters, no GPU, a backend without Triton kernels)."""
    layers: dict[tuple, LoRALinear] = {}
    for m in model.language_model.modules():
        if isinstance(m, LoRALinear) and m.lora_a is not None and m.lora_backend in TRITON_BACKENDS:
            layers.setdefault((m.in_features, m.out_slices), m)
    if device.type != "cuda" or not layers:
        return 0
    start = time.perf_counter()
    graph_metas, eager = list(graph_metas), sorted(set(eager))
    bar = tqdm(total=len(graph_metas) + len(eager), desc="Compiling LoRA kernels", unit="layout", disable=None)
    failed: list[str] = []
    # A configuration that cannot be built is left to its first use, which fails or falls back as it did before
    # (lora/ops/atmm.py): the warm-up only moves work earlier, it never stops a server from starting.
    with torch.no_grad(), compile_only(ignore_errors=True):
        for layer in layers.values():
            _attempt(layer.compile_merges, failed)
        for meta in graph_metas:
            _compile(layers.values(), meta, device, failed)
            bar.update()
        for tokens, adapters in eager:
            _compile(layers.values(), LoRAMeta.build([t % adapters for t in range(tokens)], device), device, failed)
            bar.update()
    bar.close()
    logger.info("compiled the LoRA kernels of %d layer shapes for %d batch layouts in %.1f s", len(layers),
                len(graph_metas) + len(eager), time.perf_counter() - start)
    if failed:
        logger.warning("%d LoRA kernel configurations could not be built ahead (the first: %s); they are built, or "
                       "fall back, at first use", len(failed), failed[0])
    return len(graph_metas) + len(eager)


def _compile(layers: Iterable[LoRALinear], meta: LoRAMeta, device: torch.device, failed: list[str]) -> None:
    """Every layer's own-adapter call on `meta` (a correction is the same call on a one-adapter layout)."""
    for layer in layers:
        x = torch.empty(meta.num_tokens, layer.in_features, dtype=layer.weight.dtype, device=device)
        y = torch.empty(meta.num_tokens, layer.out_features, dtype=layer.weight.dtype, device=device)
        _attempt(lambda layer=layer, x=x, y=y: layer.add_lora(x, y, LoRABatch(meta)), failed)


def _attempt(build, failed: list[str]) -> None:
    try:
        build()
    except Exception as e:  # noqa: BLE001 - see compile_lora_kernels
        failed.append(f"{type(e).__name__}: {e}")
