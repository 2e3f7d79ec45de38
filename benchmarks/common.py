"""Shared pieces of the GPU benchmarks: the Qwen2-VL-7B shapes, a result record, device facts."""

from __future__ import annotations

import datetime
import json
import os
import statistics
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


def build_checkpoint(workdir: Path, num_adapters: int, rank: int, quick: bool = False) -> tuple[Path, list[Path]]:
    """The Qwen2-VL-7B-shaped checkpoint with random bf16 weights (448x448 images: 256 tokens each) and
    `num_adapters` random adapters of `rank` on every LM linear, built on first use under `workdir`; with `quick`, a
    tiny float32 Qwen2-VL on the CPU, to check a benchmark runs."""
    from valora.testing.checkpoints import build_qwen2_vl, peft_target_regex, save_random_adapter

    device, dtype = ("cpu", torch.float32) if quick else ("cuda", torch.bfloat16)
    model = workdir / ("qwen2-vl-tiny" if quick else "qwen2-vl-7b-random")
    if not (model / "config.json").exists():
        t = time.perf_counter()
        shapes = dict(initializer_range=0.05) if quick else dict(large=True, **QWEN2_VL_7B)
        build_qwen2_vl(model, dtype=dtype, device=device, max_pixels=448 * 448, **shapes)
        print(f"checkpoint written in {time.perf_counter() - t:.0f} s", flush=True)
    adapters = []
    for i in range(num_adapters):
        path = workdir / f"adapter-r{rank}-{i}{'-tiny' if quick else ''}"
        if not (path / "adapter_config.json").exists():
            save_random_adapter(model, path, r=rank, target_modules=peft_target_regex(LM_LINEARS), seed=i,
                                dtype=dtype, device=device)
        adapters.append(path)
    return model, adapters


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


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(engine, sync: bool = True) -> list[float]:
    """Wall time of every engine step until all requests finish (host and device). With `sync` the device is
    synchronised around each step; without, only before the first and after the last, and a step's time is the
    interval between successive returns of `step`: the period of the pipeline the engine keeps (asynchronous
    scheduling launches a step while the previous one runs, which a synchronisation per step would undo)."""
    times = []
    synchronize()
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        if sync:
            synchronize()
            t = time.perf_counter()
        engine.step()
        if sync:
            synchronize()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    synchronize()
    return times


def device_time_us(fn, device: torch.device, reps: int = 20) -> float:
    """Microseconds per `fn()`: the median cold-L2 device time on a GPU (`gpu_time_us`); elsewhere (the scripts'
    quick runs, in the interpreter) the median host time of two calls after one that traces the kernels."""
    if device.type == "cuda":
        from valora.lora.tuning.timing import gpu_time_us

        return gpu_time_us(fn, reps=reps, device=device)
    fn()
    times = []
    for _ in range(2):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e6)
    return statistics.median(times)


def device_rates(device: torch.device | str, quick: bool = False) -> dict[str, float]:
    """The device's measured ceilings, which every roofline here is drawn from: `copy_bytes_per_s`, a device copy's
    bytes read plus written per second (1 GiB of bf16), and `matmul_flops_per_s`, a dense bf16 8192^3 product's
    rate; each the median of cold-L2 device times (`gpu_time_us`). With `quick`, or off a GPU, small float32
    sizes timed on the host (checks a script, measures nothing of interest)."""
    device = torch.device(device)
    gpu = device.type == "cuda" and not quick
    n, m, dtype = (1 << 29, 8192, torch.bfloat16) if gpu else (1 << 20, 256, torch.float32)
    src = torch.empty(n, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)

    def seconds(fn) -> float:
        if gpu:
            from valora.lora.tuning.timing import gpu_time_us

            return gpu_time_us(fn, reps=10, device=device) / 1e6
        fn()
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    return {"copy_bytes_per_s": 2 * src.numel() * src.element_size() / seconds(lambda: dst.copy_(src)),
            "matmul_flops_per_s": 2 * m**3 / seconds(lambda: a @ b)}


def write_result(name: str, payload: dict) -> Path:
    out = Path(os.environ.get("OUT", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({**run_info(), **payload}, indent=2))
    return path


def graph_time_us(fn, reps: int, trials: int = 10) -> float:
    """Median time of one `fn()` inside a CUDA graph holding `reps` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compile the Triton kernels and settle the allocator before capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / reps)
    del graph
    return statistics.median(times)
