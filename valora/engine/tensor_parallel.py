"""Tensor parallelism's other ranks: one worker process per further device, holding its share of the model and
following this process (rank 0, the engine) step by step.

The engine keeps everything that decides (scheduler, policy, adapter tiers, sampling, task heads, the vision pass
and its caches). `Replicas` forwards to the workers, in order, every call that changes what their devices hold or
runs a model pass: adapter registrations, slot writes and clears, mode switches, model runners (their KV caches),
CUDA-graph set-up and each step's host inputs (`StepInputs`). A worker replays the call on its own objects (the
same `LoRAManager`, `ModeSwitcher` and `ModelRunner` classes, each on its shard) and answers nothing: what it
contributes goes through the collectives inside the model. A worker that fails sends its traceback and exits; the
next call raises it here, and a collective left waiting fails after `COLLECTIVE_TIMEOUT` instead of hanging.

Workers are spawned (never forked: CUDA may be initialised) with NVLink multicast off in their environment.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch

from valora.config import EngineConfig, LoRAConfig
from valora.distributed.state import destroy_tensor_parallel, disable_nvlink_multicast, init_tensor_parallel
from valora.engine.block_manager import BlockManager
from valora.engine.model_runner import ModelRunner, StepInputs
from valora.lora.manager import LoRAManager
from valora.lora.request import LoRARequest
from valora.models.loader import build_model
from valora.models.registry import resolve_family
from valora.orchestrator.modes import ModeSwitcher

logger = logging.getLogger(__name__)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank k runs on the k-th GPU after the engine's; on the CPU every rank shares it."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


class Replicas:
    """The workers of ranks 1 .. tensor_parallel_size - 1, and this process joined to their group as rank 0."""

    def __init__(self, config: EngineConfig, hf_config, dtype: torch.dtype, device: torch.device) -> None:
        import socket

        world = config.tensor_parallel_size  # checked against the model and the devices by preflight
        backend = "nccl" if device.type == "cuda" else "gloo"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            rendezvous = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        disable_nvlink_multicast()  # inherited by the spawned workers too
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Connection] = []
        self.procs: list[multiprocessing.Process] = []
        for rank in range(1, world):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"valora-tp-{rank}", daemon=True,
                               args=(rank, world, rendezvous, backend, config, hf_config, dtype,
                                     rank_device(device, rank), theirs))
            proc.start()
            self.conns.append(ours)
            self.procs.append(proc)
        init_tensor_parallel(0, world, rendezvous, backend)
        self._lock = threading.Lock()
        logger.info("tensor parallelism over %d ranks (%s)", world, backend)

    def call(self, method: str, *args: Any) -> None:
        """Have every worker run `Worker.<method>(*args)`, after everything called before."""
        with self._lock:
            self._check()
            for conn in self.conns:
                conn.send((method, args))

    def _check(self) -> None:
        for rank, (conn, proc) in enumerate(zip(self.conns, self.procs), start=1):
            if conn.poll():
                raise RuntimeError(f"tensor-parallel rank {rank} failed:\n{conn.recv()}")
            if not proc.is_alive():
                raise RuntimeError(f"tensor-parallel rank {rank} exited (code {proc.exitcode})")

    def close(self) -> None:
        with self._lock:
            for conn, proc in zip(self.conns, self.procs):
                if proc.is_alive():
                    conn.send(("stop", ()))
            for proc in self.procs:
                proc.join(timeout=30)
                if proc.is_alive():
                    proc.kill()
        destroy_tensor_parallel()


def _worker_main(rank: int, world: int, rendezvous: str, backend: str, config: EngineConfig, hf_config,
                 dtype: torch.dtype, device: torch.device, conn: Connection) -> None:
    disable_nvlink_multicast()
    try:
        worker = Worker(rank, world, rendezvous, backend, config, hf_config, dtype, device)
        while True:
            method, args = conn.recv()
            if method == "stop":
                break
            getattr(worker, method)(*args)
    except EOFError:  # the engine went away
        pass
    except BaseException:
        conn.send(traceback.format_exc())
        raise
    finally:
        destroy_tensor_parallel()


class Worker:
    """Rank `rank`'s share of the engine's device state, changed only by the engine's calls."""

    def __init__(self, rank: int, world: int, rendezvous: str, backend: str, config: EngineConfig, hf_config,
                 dtype: torch.dtype, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.manual_seed(config.seed)
        init_tensor_parallel(rank, world, rendezvous, backend)
        self.config, self.dtype, self.device = config, dtype, device
        self.model = build_model(resolve_family(hf_config), hf_config, config.model, dtype, device)
        self.manager: LoRAManager | None = None
        self.switcher: ModeSwitcher | None = None
        self.runners: dict[str, ModelRunner] = {}

    def init_lora(self, lora: LoRAConfig, reserve_merged: bool) -> None:
        self.manager = LoRAManager(self.model, self.model.mapper, lora, self.dtype, self.device)
        self.switcher = ModeSwitcher(self.manager, graphs=not self.config.enforce_eager)
        if reserve_merged:
            self.switcher.reserve()

    def register(self, request: LoRARequest) -> None:
        self.manager.register(request)

    def unregister(self, name: str) -> None:
        self.manager.unregister(name)

    def write_slot(self, name: str, slot: int) -> None:
        self.manager.write_slot(self.manager.adapter(name), slot)

    def clear_slot(self, slot: int) -> None:
        self.manager.clear_slot(slot)

    def switch(self, name: str | None, slot: int | None) -> None:
        self.switcher.switch(name, slot)

    def make_runner(self, name: str, num_blocks: int, block_size: int, max_blocks_per_seq: int | None) -> None:
        blocks = BlockManager(num_blocks, block_size)
        self.runners[name] = ModelRunner(self.model, blocks, self.dtype, self.device,
                                         max_blocks_per_seq=max_blocks_per_seq)

    def drop_runner(self, name: str) -> None:
        del self.runners[name]
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def enable_cuda_graphs(self, name: str, max_num_seqs: int, max_loras: int, capture: bool,
                           max_num_batched_tokens: int) -> None:
        self.runners[name].enable_cuda_graphs(max_num_seqs, max_loras, capture, max_num_batched_tokens)

    @torch.inference_mode()
    def step(self, name: str, inputs: StepInputs, rows: list[int] | None) -> None:
        """The engine's step on this rank's share: the same batch, the same logits calls (their gathers)."""
        runner = self.runners[name]
        batch = inputs.to_device(self.device, runner.blocks.block_size)
        last = runner.forward(batch).index_select(0, batch.logits_rows)
        runner.logits(last, rows)
