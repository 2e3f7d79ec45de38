"""Host-to-device copies of a step's inputs that never stall the host.

`tensor.to("cuda")` from ordinary (pageable) host memory makes PyTorch wait for the whole stream, then copy through
the driver's staging buffers at a fraction of the bus's speed: a copy in the middle of a step waits for every kernel
queued before it, and an image batch's pixels crawl over. Here the data is written once into pinned (page-locked)
host memory, converted to the dtype the device reads on the way, and sent with `non_blocking=True`: one DMA queued
on the stream, after which the host goes on launching. PyTorch's pinned-memory cache keeps each buffer until its
copy has finished before handing it out again, so nothing here waits for or overwrites a copy in flight.

On the CPU the same calls build the tensors in place (no copy beyond the one that assembles them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from valora.multimodal.pixels import lookup


def upload(x: torch.Tensor | np.ndarray, device: torch.device | str) -> torch.Tensor:
    """`x` (host) on `device`, as it is: through pinned memory and a non-blocking copy on CUDA."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if torch.device(device).type != "cuda":
        return t.to(device)
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host.to(device, non_blocking=True)


def upload_rows(parts: Sequence[torch.Tensor], rows: int, dtype: torch.dtype,
                device: torch.device | str) -> torch.Tensor:
    """The host tensors `parts` ([n_i, ...], one trailing shape) stacked along dim 0 into `rows` rows of `dtype` on
    `device`, rows past the parts zero: each part is converted while it is written (one pass over it, no
    concatenated copy first), then the whole block goes over in one non-blocking copy on CUDA."""
    if not parts:
        raise ValueError("no rows to upload")
    n = sum(p.shape[0] for p in parts)
    if n > rows:
        raise ValueError(f"{n} rows do not fit {rows}")
    cuda = torch.device(device).type == "cuda"
    host = torch.empty((rows, *parts[0].shape[1:]), dtype=dtype, pin_memory=cuda,
                       device="cpu" if cuda else device)
    start = 0
    for p in parts:
        host[start : start + p.shape[0]].copy_(p)
        start += p.shape[0]
    host[n:].zero_()
    return host.to(device, non_blocking=True) if cuda else host


def upload_pixels(parts: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], rows: int, dtype: torch.dtype,
                  device: torch.device | str) -> torch.Tensor:
    """Items' uint8 pixels (`parts`, [n_i, ...], each row channel first) as `rows` rows of `dtype` on `device`,
    part i rescaled and normalised by its table `tables[i]` ([3, 256], `multimodal.pixels.PixelNormalizer`) there,
    rows past the parts zero: the bytes go over as they are, and the device does the lookup."""
    x = upload_rows(parts, rows, torch.uint8, device)
    n = sum(p.shape[0] for p in parts)
    which = torch.repeat_interleave(torch.arange(len(parts), dtype=torch.int32),
                                    torch.tensor([p.shape[0] for p in parts]))
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    out[:n] = lookup(x[:n], upload(torch.stack(list(tables)), device), upload(which, device))
    return out
