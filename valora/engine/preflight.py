"""Start-up checks that need no weights: everything about an `EngineConfig` that can be wrong is found in
milliseconds, before a model of many gigabytes loads, and reported as a `UserError` that says what to do."""

from __future__ import annotations

from pathlib import Path

from valora.config import EngineConfig, resolve_device, resolve_dtype
from valora.errors import UserError
from valora.lora.ops import BACKENDS
from valora.models.registry import resolve_family
from valora.orchestrator.policy import policy_classes


def model_positions(hf_config) -> int | None:
    """How many positions the language model was built for (`max_position_embeddings`), when the config says."""
    text_cfg = getattr(hf_config, "text_config", hf_config)
    return getattr(text_cfg, "max_position_embeddings", None)


def check_engine_config(config: EngineConfig):
    """Raises `UserError` for a config that cannot work; returns the model's Hugging Face config."""
    from transformers import AutoConfig

    model_dir = Path(config.model)
    if not (model_dir / "config.json").is_file():
        if (model_dir / "adapter_config.json").is_file():  # a PEFT adapter given where its base model goes
            raise UserError(f"model {config.model} is a LoRA adapter (adapter_config.json); pass its base model "
                            "directory as the model and the adapter with --lora-modules NAME=PATH (serve) or --lora "
                            "NAME=PATH (generate)")
        what = "does not exist" if not model_dir.exists() else "is not a Hugging Face model directory (no config.json)"
        raise UserError(f"model {config.model} {what}; pass a local model directory")
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {e}") from e
    resolve_family(hf_config)
    if config.tokenizer is not None:
        tok = Path(config.tokenizer)
        if not tok.is_dir() or not any((tok / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            raise UserError(f"tokenizer {config.tokenizer} is not a tokenizer directory (no tokenizer.json or "
                            "tokenizer_config.json)")
    device = resolve_device(config.device)
    resolve_dtype(config.dtype, None, device)
    positions = model_positions(hf_config)
    if config.max_model_len is not None:
        if config.max_model_len < 1:
            raise UserError(f"max_model_len must be positive, got {config.max_model_len}")
        if positions is not None and config.max_model_len > positions:
            raise UserError(f"max_model_len {config.max_model_len} is over the {positions} positions the model was "
                            f"built for (max_position_embeddings); use at most {positions}")
    check_tensor_parallel(config, hf_config, device)
    if config.lora.backend != "auto" and config.lora.backend not in BACKENDS:
        raise UserError(f"unknown LoRA backend {config.lora.backend!r}; choose auto, {', '.join(sorted(BACKENDS))}")
    if config.scheduler.policy not in policy_classes():
        raise UserError(f"unknown scheduler {config.scheduler.policy!r}; choose one of "
                        f"{', '.join(policy_classes())}")
    return hf_config


def check_tensor_parallel(config: EngineConfig, hf_config, device) -> None:
    """The model must split evenly: query heads, KV heads (or ranks over KV heads) and the MLP's hidden units."""
    n = config.tensor_parallel_size
    if n < 1:
        raise UserError(f"tensor_parallel_size must be at least 1, got {n}")
    if n == 1:
        return
    text = getattr(hf_config, "text_config", hf_config)
    heads = text.num_attention_heads
    kv = getattr(text, "num_key_value_heads", None) or heads
    if heads % n or (kv % n and n % kv) or text.intermediate_size % n:
        raise UserError(f"tensor_parallel_size {n} does not divide the model: {heads} attention heads, {kv} KV heads "
                        f"and {text.intermediate_size} MLP units must each split evenly (KV heads may also be fewer "
                        "than the ranks, dividing them)")
    if device.type == "cuda":
        import torch

        visible = torch.cuda.device_count() - (device.index or 0)
        if n > visible:
            raise UserError(f"tensor_parallel_size {n} needs {n} GPUs from {device}; {visible} are visible")
