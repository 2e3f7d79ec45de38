"""Shared pieces of the GPU benchmarks: the Qwen2-VL-7B shapes, a result record, device facts."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import time
from pathlib import Path

import torch

# Qwen2-VL-7B: LM hidden 3584, intermediate 18944, 28 layers, 28 heads / 4 KV heads, vocab 152064;
# ViT depth 32, width 1280, 16 heads.
QWEN2_VL_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4, vision_depth=32, vision_embed_dim=1280, vision_num_heads=16,
    max_position_embeddings=32768, initializer_range=0.02,
)
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def git_commit() -> str:
    """VALORA_COMMIT when set (a copy of the tree without its own .git, as on the GPU machine), else git's HEAD."""
    if os.environ.get("VALORA_COMMIT"):
        return os.environ["VALORA_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_info() -> dict:
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
    }


def timed_steps(engine) -> list[float]:
    """Wall time of every engine step until all requests finish (host and device, synchronised)."""
    times = []
    while engine.has_unfinished_requests():
        torch.cuda.synchronize()
        t = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def write_result(name: str, payload: dict) -> Path:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**run_info(), **payload}, indent=2))
    return path
