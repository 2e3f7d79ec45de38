"""Capturing one CUDA graph of a function that reads and writes only tensors that stay put (static inputs, weights,
caches): what the vision pass graphs and the prefill graphs share."""

from __future__ import annotations

from collections.abc import Callable

import torch


@torch.inference_mode()
def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device, pool=None
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """(graph, its output tensor). `fn` runs twice eagerly on a side stream first, off the graph (Triton compiles,
    cuBLAS picks its kernels); the capture allocates from `pool` (a graph's `pool()`: graphs that never run at the
    same time can share one), or from a new pool when None."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out
