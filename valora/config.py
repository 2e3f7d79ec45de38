"""Engine configuration: one dataclass per concern, resolved once at start-up."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from valora.errors import UserError

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available on this machine (torch {torch.__version__}); "
                            "use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise UserError(f"device {device!r} is not supported: use auto, cpu, cuda or cuda:N")
    return dev


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    """`auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU, where bf16 matmuls are slow."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return checkpoint_dtype if checkpoint_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


@dataclass
class CacheConfig:
    """Paged KV cache. `num_blocks=None` sizes it from memory (GPU: utilisation target, CPU: `cpu_kv_cache_gb`)."""

    block_size: int = 16
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gb: float = 1.0
    enable_prefix_caching: bool = True  # full blocks reused across requests of the same adapter (vLLM's flag)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise UserError("block_size must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise UserError("gpu_memory_utilization must be in (0, 1]")


@dataclass
class LoRAConfig:
    """Adapter capacity: `max_loras` GPU slots over a host cache of `max_cpu_loras` adapters."""

    max_loras: int = 8
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise UserError("max_loras must be at least 1")
        if self.max_lora_rank < 1:
            raise UserError("max_lora_rank must be at least 1")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        if self.max_cpu_loras < self.max_loras:
            raise UserError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")


@dataclass
class SchedulerConfig:
    """Continuous batching limits per step. With chunked prefill a prompt is split across steps within the token
    budget, and its images' vision passes within the encoder budget (`max_num_encoder_input_tokens`: a chunk ends
    before an image whose embeddings would exceed it), so the two bound every step's latency; without chunking a
    step must fit a whole prompt. The encoder budget's default and why: `valora.engine.scheduler.Scheduler`."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int | None = None  # default: 2048 with chunked prefill, else max(max_model_len, 2048)
    max_waiting: int = 4096
    policy: str = "valora"  # valora | slora | punica | dlora (see valora/orchestrator)
    max_wait_ms: float = 1000.0  # valora: a request waiting this long is admitted first
    enable_chunked_prefill: bool = True
    # The encoder compute budget (vLLM's name): image tokens whose embeddings one step may compute (`Scheduler`).
    # Default: max_num_batched_tokens with chunked prefill, none without (whole prompts, as before).
    max_num_encoder_input_tokens: int | None = None
    # With chunked prefill, a step's vision work charges the token budget too (an image its LM tokens), so the one
    # budget bounds a step's whole work: the running streams' inter-token tail under an image burst, for about a
    # step more of an image's time to first token (`Scheduler`).
    encoder_in_token_budget: bool = False
    # Schedule and launch step n+1 while step n runs, its new input tokens read on the device (vLLM's
    # --async-scheduling); ends that a token decides are found one step late and the extra token dropped.
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise UserError("max_num_seqs must be at least 1")
        if self.max_wait_ms <= 0:
            raise UserError("max_wait_ms must be positive")
        if self.max_num_encoder_input_tokens is not None and self.max_num_encoder_input_tokens < 1:
            raise UserError("max_num_encoder_input_tokens must be at least 1")
        if self.encoder_in_token_budget and not self.enable_chunked_prefill:
            raise UserError("--encoder-in-token-budget needs chunked prefill (a whole prompt is never cut to fit the "
                            "budget); drop --no-enable-chunked-prefill or the flag")


# Attention kernels of the vision towers (vLLM's names; models/layers/vit.py): auto = TRITON_ATTN on CUDA, else SDPA
MM_ENCODER_ATTN_BACKENDS = ("auto", "TORCH_SDPA", "TRITON_ATTN", "FLASH_ATTN", "FLEX_ATTENTION")


@dataclass
class MultiModalConfig:
    """Limits on image and video inputs (requests over them are refused with a clear error), how videos are
    sampled, where media may come from, and the vision tower's attention kernel."""

    max_images_per_prompt: int = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    embed_cache_mb: int = 512  # image embeddings kept by content hash (0 disables)
    max_videos_per_prompt: int = 4
    max_video_bytes: int = 32 * 1024 * 1024  # encoded bytes per video
    max_video_seconds: float = 600.0  # length of a video
    max_video_frames: int = 64  # frames sampled from one video
    video_fps: float = 2.0  # frames sampled per second of video, unless a request says otherwise
    video_num_frames: int = 32  # frames sampled at most, unless a request says otherwise (within max_video_frames)
    allowed_media_domains: tuple[str, ...] = ()  # http(s) hosts media URLs may be fetched from (none: no fetching)
    media_fetch_timeout_s: float = 15.0  # one remote fetch, whole (connect, redirects, body)
    mm_encoder_attn_backend: str = "auto"

    def __post_init__(self) -> None:
        if self.mm_encoder_attn_backend not in MM_ENCODER_ATTN_BACKENDS:
            raise ValueError(f"unknown mm_encoder_attn_backend {self.mm_encoder_attn_backend!r}; choose one of "
                             f"{', '.join(MM_ENCODER_ATTN_BACKENDS)}")


@dataclass
class EngineConfig:
    model: str
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str | torch.device | None = "auto"
    seed: int = 0
    max_model_len: int | None = None
    enable_lora: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    multimodal: MultiModalConfig = field(default_factory=MultiModalConfig)
    enforce_eager: bool = False  # GPU: run decode steps and vision passes eagerly (same numerics), not from graphs
    step_log: str | None = None  # write one JSON line per step here (`.gz`: compressed)
    tensor_parallel_size: int = 1  # devices (processes) the model is split over; docs/distributed.md
