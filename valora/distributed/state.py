"""The tensor-parallel group of this process and the three collectives the parallel layers need.

One group per process, set once by `init_tensor_parallel` (NCCL between GPUs, gloo on the CPU); until then, and
with one rank, every collective is the identity, so the single-device path pays nothing. Every process that joins
a group first sets `NVLINK_MULTICAST_OFF` in its environment: the GPU machines lend NVLink without multicast
(NCCL's NVLS and torch's symmetric-memory multicast would fail or hang there).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# A rank that died leaves the others in a collective: this long, and they fail instead of hanging.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=300)


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def split(self, size: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's even share of `size` rows or columns."""
        if size % self.world_size:
            raise ValueError(f"{what} ({size}) must be a multiple of tensor_parallel_size ({self.world_size})")
        n = size // self.world_size
        return self.rank * n, n


_current = TensorParallel()


class Followers(Protocol):
    """The other ranks of a tensor-parallel engine (valora/engine/tensor_parallel.py): `call` has each of them
    run a method of its worker after every earlier call; objects that change device state tell them through it."""

    def call(self, method: str, *args: Any) -> None: ...


def tp() -> TensorParallel:
    """This process's tensor-parallel group (rank 0 of 1 unless `init_tensor_parallel` ran)."""
    return _current


def disable_nvlink_multicast() -> None:
    for key, value in NVLINK_MULTICAST_OFF.items():
        os.environ.setdefault(key, value)


def init_tensor_parallel(rank: int, world_size: int, init_method: str, backend: str) -> TensorParallel:
    """Join the group of `world_size` processes at `init_method` (a `tcp://host:port` or `file://` rendezvous)."""
    global _current
    disable_nvlink_multicast()
    if world_size > 1:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        _current = TensorParallel(rank, world_size, dist.group.WORLD)
    else:
        _current = TensorParallel()
    return _current


def destroy_tensor_parallel() -> None:
    global _current
    if _current.enabled:
        dist.destroy_process_group()
    _current = TensorParallel()


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place."""
    if _current.enabled:
        dist.all_reduce(x, group=_current.group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Every rank's `x` concatenated along `dim`, in rank order."""
    if not _current.enabled:
        return x
    parts = [torch.empty_like(x) for _ in range(_current.world_size)]
    dist.all_gather(parts, x.contiguous(), group=_current.group)
    return torch.cat(parts, dim=dim)


def broadcast(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `x` on every rank (the others pass a tensor of the same shape and dtype to fill), in place."""
    if _current.enabled:
        dist.broadcast(x, src, group=_current.group)
    return x
