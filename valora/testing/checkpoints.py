"""Build model checkpoints, tokenizers and PEFT adapters offline, saved exactly as `save_pretrained` does.

No model hub is reachable from CI or the GPU machine, so tests and benchmarks build their own models from
configs (random or briefly trained weights). The engine then loads them through its real loading code.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from valora.testing.families import FAMILIES, TinyFamily

_CORPUS = (
    "the quick brown fox jumps over the lazy dog . a picture of a cat sitting on a mat . "
    "what digit is shown in the image ? the answer is zero one two three four five six seven eight nine . "
    "describe the scene : a red car parks near a tall building while people walk on the street . "
    "is the number odd or even ? odd even yes no left right top bottom count objects in the frame . "
    "detect the box around the object ( x1 , y1 ) , ( x2 , y2 ) . caption : a dog runs across green grass . "
    "Hello world ! héllo wörld ✓ 0123456789 <>[](){}:;,.?!-+*/=%$#@&"
)


def build_tokenizer(family: str | TinyFamily, out_dir: str | Path, vocab_size: int = 512,
                    corpus: Iterable[str] | None = None):
    """A byte-level BPE tokenizer with the family's special tokens and chat template, trained in milliseconds."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family] if isinstance(family, str) else family
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(fam.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(corpus) if corpus is not None else [_CORPUS] * 4, trainer)
    if fam.add_bos:
        bos = [(fam.bos, tok.token_to_id(fam.bos))]
        tok.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                           special_tokens=bos)
    template = None if fam.template_in_processor else fam.chat_template
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=fam.eos, pad_token=fam.pad, bos_token=fam.bos,
                                        chat_template=template, extra_special_tokens=dict(fam.named_tokens))
    tokenizer.save_pretrained(out_dir)
    if fam.template_in_processor:  # as llava-hf ships it: beside the processor, unseen by AutoTokenizer
        (Path(out_dir) / "chat_template.json").write_text(json.dumps({"chat_template": fam.chat_template}))
    return tokenizer


def build_model(
    family: str | TinyFamily,
    out_dir: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer_vocab: int = 512,
    corpus: Iterable[str] | None = None,
    large: bool = False,
    device: str = "cpu",
    **knobs,
) -> Path:
    """A complete model directory of one family: config, safetensors weights, tokenizer, image processor.

    Small models are initialised by transformers and saved with `save_pretrained`; `large=True` writes random
    weights tensor by tensor (on `device`) so a 7B-shaped checkpoint never has to fit in memory twice. `knobs`
    are the family's config and image-processor settings (see `valora.testing.families`)."""
    from transformers import AutoModelForImageTextToText, GenerationConfig

    fam = FAMILIES[family] if isinstance(family, str) else family
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(fam, out, vocab_size=tokenizer_vocab, corpus=corpus)
    ids = fam.token_ids(tokenizer)
    image_knobs = {k: knobs.pop(k) for k in list(knobs) if k in fam.image_knobs and k not in fam.shared_knobs}
    image_knobs |= {k: knobs[k] for k in fam.shared_knobs if k in knobs}
    vocab = knobs.pop("vocab_size", max(len(tokenizer), tokenizer_vocab))
    cfg = fam.config(vocab, ids, **knobs)
    cfg.architectures = [fam.architecture]
    if large:
        save_random_checkpoint(cfg, out, dtype=dtype, device=device, seed=seed, std=cfg.text_config.initializer_range)
        GenerationConfig(eos_token_id=ids["eos"], pad_token_id=ids["pad"]).save_pretrained(out)
    else:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg).to(dtype)
        model.generation_config.eos_token_id = ids["eos"]
        model.generation_config.pad_token_id = ids["pad"]
        model.save_pretrained(out)
    fam.image_processor(**image_knobs).save_pretrained(out)
    return out


def build_qwen2_vl(out_dir: str | Path, *, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112, **kwargs) -> Path:
    """A Qwen2-VL model directory (see `build_model`)."""
    return build_model("qwen2_vl", out_dir, min_pixels=min_pixels, max_pixels=max_pixels, **kwargs)


def peft_target_regex(modules: Sequence[str], scope: str = "language_model") -> str:
    """A PEFT `target_modules` regex (full match) for the given leaf names under one part of the model."""
    return rf".*{scope}.*\.({'|'.join(modules)})$"


def build_peft_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 8,
    lora_alpha: int | None = None,
    target_modules: str | Sequence[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    init_std: float = 0.1,
    base_model=None,
) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, saved with `save_pretrained`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = base_model if base_model is not None else AutoModelForImageTextToText.from_pretrained(base_dir)
    base = copy.deepcopy(base)  # get_peft_model mutates the model it wraps
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
        use_rslora=use_rslora, init_lora_weights=False, lora_dropout=0.0,
    )
    peft_model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * init_std)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)


def save_random_adapter(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int,
    target_modules: str | Sequence[str],
    lora_alpha: int | None = None,
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.02,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> Path:
    """A PEFT adapter with random weights for a (possibly 7B-shaped) checkpoint, written without loading it:
    module shapes come from a meta-device model, names and config from PEFT itself."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    pattern = target_modules if isinstance(target_modules, str) else None
    names = set(target_modules) if pattern is None else set()
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        hit = re.fullmatch(pattern, name) if pattern else name.rsplit(".", 1)[-1] in names
        if not hit:
            continue
        for part, shape in (("lora_A", (r, module.in_features)), ("lora_B", (module.out_features, r))):
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
            tensors[f"base_model.model.{name}.{part}.weight"] = t.to(dtype).cpu()
    if not tensors:
        raise ValueError(f"target_modules {target_modules!r} match no linear layer of {model_dir}")
    save_file(tensors, os.fspath(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r, use_rslora=use_rslora,
                        target_modules=target_modules if pattern else sorted(names), lora_dropout=0.0,
                        base_model_name_or_path=str(model_dir))
    config.save_pretrained(out)
    return out


_NORM = re.compile(r"(norm[^.]*|ln_q)\.(weight|bias)$")


def save_random_checkpoint(
    config, out_dir: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "cpu", std: float = 0.02,
    seed: int = 0, shard_bytes: int = 4 << 30,
) -> Path:
    """Write random weights for `config` in the sharded safetensors layout of `save_pretrained`, without ever
    materialising the whole model (a 7B-shaped checkpoint is built one tensor at a time)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    params = dict(model.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        params.pop("lm_head.weight", None)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, meta in params.items():
        if _NORM.search(name):  # norms start as the identity: ones, and zero biases
            t = (torch.ones if name.endswith("weight") else torch.zeros)(meta.shape, dtype=dtype, device=device)
        else:
            t = (torch.randn(meta.shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)
        nbytes = t.numel() * t.element_size()
        if size + nbytes > shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t.cpu()
        size += nbytes
    index: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.fspath(out / fname), metadata={"format": "pt"})
        for k, v in shard.items():
            index[k] = fname
            total += v.numel() * v.element_size()
    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2)
        )
    config.save_pretrained(out)
    return out
