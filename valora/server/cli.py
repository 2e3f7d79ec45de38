"""`valora serve MODEL [options]`: the OpenAI-compatible server, with vLLM's flag names where they exist."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from valora.config import MM_ENCODER_ATTN_BACKENDS, EngineConfig
from valora.errors import UserError
from valora.lora.request import check_adapter_name
from valora.server.launch import port_number

if TYPE_CHECKING:  # the app imports the engine: loaded when a server is configured, not for `--help`
    from valora.server.app import ServerConfig

logger = logging.getLogger("valora.server")


def _lora_module(text: str) -> tuple[str, str]:
    """`name=path`, or vLLM's JSON form `{"name": ..., "path": ...}`."""
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
            name, path = str(obj["name"]), str(obj["path"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON {text!r}: {e}") from e
    else:
        name, sep, path = text.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--lora-modules takes name=path, got {text!r}")
    try:
        check_adapter_name(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--lora-modules {text!r}: {e}") from e
    return name, path


def _media_io_kwargs(text: str):
    """vLLM's `--media-io-kwargs` JSON: `{"video": {"fps": F, "num_frames": N}}`, the default video sampling."""
    from valora.config import MultiModalConfig
    from valora.multimodal.inputs import InputError
    from valora.multimodal.video import video_sampling

    try:
        return video_sampling(MultiModalConfig(), json.loads(text))
    except (json.JSONDecodeError, InputError) as e:
        raise argparse.ArgumentTypeError(f"bad --media-io-kwargs {text!r}: {e}") from e


_EPILOG = """\
endpoints:
  GET  /v1/models                 the base model and every loaded adapter (adapters with `parent`)
  POST /v1/chat/completions       chat, images and videos as image_url / video_url parts; `model` picks the adapter;
                                  logprobs, penalties, response_format / guided_* structured outputs
  POST /v1/completions            plain-text prompts (echo, logprobs)
  POST /v1/classify               a task head's answer after one prefill (chat `messages` or text `input`)
  POST /v1/load_lora_adapter      {"lora_name": ..., "lora_path": ...} at run time
  POST /v1/unload_lora_adapter    {"lora_name": ...}
  GET  /health                    200 while the engine runs
  GET  /metrics                   Prometheus text format (valora:* metrics; vllm:* too with --vllm-compatible-metrics)
  GET  /ping, POST /ping          the same as /health
  GET  /version                   the server's version
  POST /tokenize                  {"model", "prompt" or "messages"} -> token ids, as the engine sees them
  POST /detokenize                {"model", "tokens"} -> text

example:
  valora serve ./Qwen2-VL-7B-Instruct --lora-modules detector=./adapters/detector --port 8000
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    p.add_argument("model", help="Hugging Face model directory of a Qwen2-VL, Qwen2.5-VL, LLaVA (CLIP tower) or "
                                 "InternVL (transformers' -hf format) checkpoint")

    g = p.add_argument_group("model")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="name(s) the base model answers to in `model` (default: MODEL as given)")
    g.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory (default: MODEL)")
    g.add_argument("--dtype", default="auto",
                   help="auto (the checkpoint's on GPU, float32 on CPU), float16, bfloat16 or float32 (default: auto)")
    g.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu (default: auto)")
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: 0)")
    g.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length, prompt plus output (default: the model's)")

    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[], metavar="NAME=PATH",
                   help='adapters served from the start: name=path or JSON {"name": ..., "path": ...}')
    g.add_argument("--enable-lora", action="store_true",
                   help="accepted for vLLM compatibility; LoRA is always enabled")
    g.add_argument("--max-loras", type=int, default=8, metavar="N",
                   help="adapters resident on the device at once, i.e. adapter slots (default: 8)")
    g.add_argument("--max-lora-rank", type=int, default=64, metavar="R",
                   help="largest adapter rank accepted (default: 64)")
    g.add_argument("--max-cpu-loras", type=int, default=None, metavar="N",
                   help="adapters kept loaded in host memory (default: --max-loras)")
    g.add_argument("--lora-backend", default="auto",
                   help="LoRA kernel backend: atmm, sgmv, bgmv, gather or torch (default: auto: atmm on a GPU, torch "
                        "on the CPU)")
    g.add_argument("--enable-lora-resolver", action="store_true",
                   help="adapters on first use: a request whose `model` names an adapter that is not loaded but is a "
                        "directory under --lora-root loads it (once, however many requests name it)")
    g.add_argument("--lora-root", type=Path, default=None, metavar="DIR",
                   help="POST /v1/load_lora_adapter reads adapters only under DIR (no '..', no symlinks out)")

    g = p.add_argument_group("scheduling and memory")
    g.add_argument("--scheduler", default="valora", choices=["valora", "slora", "punica", "dlora"],
                   help="policy choosing each step's mode (merged / unmerged / mixture) and batch; the baselines "
                        "reproduce S-LoRA, Punica and dLoRA (default: valora)")
    g.add_argument("--max-wait-ms", type=float, default=1000.0, metavar="MS",
                   help="valora: a request waiting this long is admitted before all others (default: 1000)")
    g.add_argument("--step-log", default=None, metavar="PATH",
                   help="append one JSON line per engine step to PATH (gzip if it ends in .gz): mode, batch, "
                        "predicted and measured time; read by `valora bench costs` (default: off)")
    g.add_argument("--max-num-seqs", type=int, default=128, metavar="N",
                   help="sequences in the running batch (default: 128)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N",
                   help="tokens per step (default: 2048 with chunked prefill, else max(max-model-len, 2048))")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="split prompts (image tokens included) across steps within --max-num-batched-tokens, "
                        "running decodes first, so new prompts never stall running streams for more than one "
                        "step's budget (default: on)")
    g.add_argument("--max-num-encoder-input-tokens", type=int, default=None, metavar="N",
                   help="encoder compute budget: image tokens whose embeddings one step may compute; a chunk ends "
                        "before an image over it, but a step always takes one (default: --max-num-batched-tokens "
                        "with chunked prefill, else none)")
    g.add_argument("--encoder-in-token-budget", action="store_true",
                   help="with chunked prefill, an image's vision pass also charges --max-num-batched-tokens (its "
                        "LM tokens' worth), so a step encodes or prefills within the one budget: a lower inter-token "
                        "tail for running streams under image bursts, about a step more of an image's TTFT")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                   help="schedule and launch each step while the previous one runs on the device, its new input "
                        "tokens read there; outputs are the same (default: on)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache blocks of a prompt prefix already computed for the same adapter "
                        "(and images) (default: on)")
    g.add_argument("--max-queued-requests", type=int, default=4096, metavar="N",
                   help="requests that may wait beyond the running batch; more get 503 with Retry-After "
                        "(default: 4096)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    g.add_argument("--block-size", type=int, default=16, metavar="N", help="tokens per KV cache block (default: 16)")
    g.add_argument("--num-kv-blocks", type=int, default=None, metavar="N",
                   help="KV cache blocks (default: sized from free memory)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N devices (GPUs from --device on, or N processes on the CPU): "
                        "attention heads, MLP units and the vocabulary, adapters sharded alike (default: 1)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="GPU: run decode steps and vision passes eagerly instead of replaying CUDA graphs "
                        "(slower; for debugging)")
    g.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, metavar="GB",
                   help="KV cache size when running on the CPU (default: 1.0)")

    g = p.add_argument_group("HTTP server and request limits")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for all (default: 127.0.0.1)")
    g.add_argument("--port", type=port_number, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--api-key", default=os.environ.get("VALORA_API_KEY") or None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every /v1 route (default: $VALORA_API_KEY)")
    g.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                   help="image_url may name local files under DIR (default: only data: URLs)")
    g.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                   help="image_url may be an http(s) URL on one of these hosts (every redirect is checked too); "
                        "default: none, no outbound fetches")
    g.add_argument("--media-fetch-timeout", type=float, default=15.0, metavar="S",
                   help="seconds one remote media fetch may take, whole (default: 15)")
    g.add_argument("--max-images-per-prompt", type=int, default=8, metavar="N",
                   help="images per request (default: 8)")
    g.add_argument("--max-image-pixels", type=int, default=4096 * 4096, metavar="N",
                   help="width x height per image (default: 4096*4096)")
    g.add_argument("--max-image-bytes", type=int, default=20 * 2**20, metavar="N",
                   help="encoded bytes per image (default: 20 MiB)")
    g.add_argument("--max-videos-per-prompt", type=int, default=4, metavar="N",
                   help="videos per request (default: 4)")
    g.add_argument("--max-video-bytes", type=int, default=32 * 2**20, metavar="N",
                   help="encoded bytes per video (default: 32 MiB)")
    g.add_argument("--max-video-seconds", type=float, default=600.0, metavar="S",
                   help="length of a video (default: 600)")
    g.add_argument("--max-video-frames", type=int, default=64, metavar="N",
                   help="frames sampled from one video, at most (default: 64)")
    g.add_argument("--media-io-kwargs", type=_media_io_kwargs, default=None, metavar="JSON",
                   help='default video sampling, vLLM\'s spelling: \'{"video": {"fps": 2, "num_frames": 32}}\' '
                        "(frames a second of video, at most num_frames; requests may override with their own "
                        "media_io_kwargs; default: fps 2, num_frames 32)")
    g.add_argument("--mm-encoder-attn-backend", default="auto", choices=list(MM_ENCODER_ATTN_BACKENDS),
                   help="attention kernel of the vision tower: TRITON_ATTN (ours, varlen, replayed from CUDA graphs), "
                        "FLASH_ATTN (torch's FlashAttention varlen, graphs too), TORCH_SDPA, FLEX_ATTENTION "
                        "(default: auto = TRITON_ATTN on CUDA, TORCH_SDPA on the CPU)")
    g.add_argument("--image-cache-mb", type=int, default=512, metavar="MB",
                   help="device memory for image embeddings kept by content hash, so repeated frames are encoded "
                        "once (0 disables; default: 512)")
    g.add_argument("--allow-special-tokens-in-messages", action="store_true",
                   help="tokenise special-token strings typed in chat messages (<|im_start|>, ...) as control tokens; "
                        "by default they stay text, so message text cannot open a turn of another role")
    g.add_argument("--max-request-body-bytes", type=int, default=64 * 2**20, metavar="N",
                   help="larger request bodies get 413 (default: 64 MiB)")
    g.add_argument("--timeout-keep-alive", type=float, default=5.0, metavar="S",
                   help="close a connection idle this long between requests (uvicorn's; default: 5)")
    g.add_argument("--timeout-request-header", type=float, default=10.0, metavar="S",
                   help="close a connection whose request line and headers take longer than this (default: 10)")
    g.add_argument("--timeout-request-body", type=float, default=60.0, metavar="S",
                   help="close a connection whose request body takes longer than this after its headers "
                        "(default: 60)")
    g.add_argument("--api-server-count", type=int, default=1, metavar="N",
                   help="HTTP front-end processes (HTTP, images, chat template, tokenising, detokenising) on the "
                        "same port, in front of the one engine-core process (default: 1)")
    g.add_argument("--limit-concurrency", type=int, default=None, metavar="N",
                   help="open connections (and requests) beyond which uvicorn answers 503 "
                        "(default: --max-num-seqs + --max-queued-requests + 128)")
    g.add_argument("--vllm-compatible-metrics", action="store_true",
                   help="/metrics also exports, under vLLM's vllm: names and labels, the metrics vLLM has (queues, "
                        "KV usage, vllm:lora_requests_info, latencies), so routers built for vLLM (llm-d, Gateway "
                        "API Inference Extension) score this server unchanged")

    g = p.add_argument_group("logging")
    g.add_argument("--disable-log-requests", action="store_true", help="no log line per request")
    g.add_argument("--disable-log-stats", action="store_true",
                   help="no periodic line of throughput, running/waiting requests, KV cache use, mode and adapter "
                        "slots")


def engine_config(args: argparse.Namespace):
    from valora.config import CacheConfig, EngineConfig, LoRAConfig, MultiModalConfig, SchedulerConfig

    return EngineConfig(
        model=args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, seed=args.seed,
        max_model_len=args.max_model_len, enable_lora=True,
        lora=LoRAConfig(args.max_loras, args.max_lora_rank, args.max_cpu_loras, args.lora_backend),
        cache=CacheConfig(args.block_size, args.num_kv_blocks, args.gpu_memory_utilization, args.cpu_kv_cache_gb,
                          args.enable_prefix_caching),
        scheduler=SchedulerConfig(args.max_num_seqs, args.max_num_batched_tokens, args.max_queued_requests,
                                  policy=args.scheduler, max_wait_ms=args.max_wait_ms,
                                  enable_chunked_prefill=args.enable_chunked_prefill,
                                  max_num_encoder_input_tokens=args.max_num_encoder_input_tokens,
                                  encoder_in_token_budget=args.encoder_in_token_budget,
                                  async_scheduling=args.async_scheduling),
        multimodal=MultiModalConfig(
            max_images_per_prompt=args.max_images_per_prompt, max_image_pixels=args.max_image_pixels,
            max_image_bytes=args.max_image_bytes, embed_cache_mb=args.image_cache_mb,
            allowed_media_domains=tuple(args.allowed_media_domains), media_fetch_timeout_s=args.media_fetch_timeout,
            max_videos_per_prompt=args.max_videos_per_prompt, max_video_bytes=args.max_video_bytes,
            max_video_seconds=args.max_video_seconds, max_video_frames=args.max_video_frames,
            **({"video_fps": args.media_io_kwargs.fps, "video_num_frames": args.media_io_kwargs.num_frames}
               if args.media_io_kwargs else {}),
            mm_encoder_attn_backend=args.mm_encoder_attn_backend),
        enforce_eager=args.enforce_eager, step_log=args.step_log,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def check_paths(args: argparse.Namespace) -> None:
    """The server's own paths and adapters, before anything loads (the engine checks the model's)."""
    from valora.lora.adapter import check_adapter_dir

    if args.enable_lora_resolver and args.lora_root is None:
        raise UserError("--enable-lora-resolver loads adapters from --lora-root DIR: give one")
    for flag, path in (("--lora-root", args.lora_root), ("--allowed-local-media-path", args.allowed_local_media_path)):
        if path is not None and not path.is_dir():
            raise UserError(f"{flag} {path} is not a directory")
    for name, path in args.lora_modules:
        check_adapter_dir(name, path, args.max_lora_rank)


def server_config(args: argparse.Namespace) -> ServerConfig:
    from valora.server.app import ServerConfig

    if args.api_server_count < 1:
        raise UserError("--api-server-count must be at least 1")
    return ServerConfig(
        served_model_names=args.served_model_name or [args.model], lora_modules=args.lora_modules,
        api_key=args.api_key, lora_root=args.lora_root, allowed_local_media_path=args.allowed_local_media_path,
        max_body_bytes=args.max_request_body_bytes, max_queued_requests=args.max_queued_requests,
        allow_special_tokens_in_messages=args.allow_special_tokens_in_messages,
        log_requests=not args.disable_log_requests, log_stats=not args.disable_log_stats,
        lora_resolver=args.enable_lora_resolver,
        vllm_compatible_metrics=args.vllm_compatible_metrics,
        api_server_count=args.api_server_count,
    )


def checked_configs(args: argparse.Namespace) -> tuple[EngineConfig, ServerConfig]:
    """(EngineConfig, ServerConfig) of `valora serve`'s flags, every check that needs no weights done."""
    from valora.engine.preflight import check_engine_config

    config = server_config(args)
    engine_cfg = engine_config(args)
    check_engine_config(engine_cfg)
    check_paths(args)
    return engine_cfg, config


def run(args: argparse.Namespace) -> int:
    from valora.server.launch import ConnectionLimits, bind, serve

    engine_cfg, config = checked_configs(args)
    sock = bind(args.host, args.port)
    concurrency = args.limit_concurrency or args.max_num_seqs + args.max_queued_requests + 128
    limits = ConnectionLimits(args.timeout_keep_alive, args.timeout_request_header, args.timeout_request_body,
                              concurrency)
    with sock:
        return serve(engine_cfg, config, sock, limits)
