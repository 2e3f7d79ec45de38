"""Load a PEFT LoRA adapter directory and check it against the served model before it can touch a request.

Every failure names the adapter and the problem (missing files, corrupt config or weights, a rank over the
limit, modules the model does not have, shapes of another base model, PEFT features we do not serve). Configs come
from clients at run time, so every value is checked before use: `r` a positive integer that the tensors have, a
finite positive `lora_alpha`, finite weights, and `rank_pattern` / `alpha_pattern` keys matched by RE2, whose time
is linear in the module name (Python's `re` backtracks: one crafted key stalled the engine for seconds).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import re2
import torch
from torch import nn

from valora.errors import UserError
from valora.models.layers.linear import LoRALinear
from valora.models.loader import WeightMapper
from valora.paths import check_path


class AdapterError(UserError):
    """An adapter that cannot be served; the message says which and why."""


_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class LoRAAdapter:
    name: str
    path: str
    rank: int  # largest rank over its modules
    scaling: float  # adapter-wide scale; per-module deviations (rank/alpha patterns) are folded into B
    weights: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]]  # (module, slice) -> (A, B)
    targets: tuple[str, ...]  # module paths in the served model

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def touches_vision(self) -> bool:
        return any(".visual." in t or ".vision_tower." in t or "projector" in t for t in self.targets)


def _read_config(d: Path, name: str) -> dict:
    path = d / "adapter_config.json"
    if not path.is_file():
        raise AdapterError(f"adapter {name!r}: {d} has no adapter_config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: corrupt adapter_config.json ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"adapter {name!r}: adapter_config.json is not a JSON object")
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter {name!r}: peft_type {peft_type} is not LoRA")
    unsupported = {
        "use_dora": "DoRA", "modules_to_save": "modules_to_save (fully trained layers)",
        "fan_in_fan_out": "fan_in_fan_out", "lora_bias": "LoRA bias",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise AdapterError(f"adapter {name!r}: {what} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"adapter {name!r}: bias={cfg['bias']!r} is not supported (only 'none')")
    _check_positive(cfg.get("r"), f"adapter {name!r}: adapter_config.json 'r'", integer=True)
    _check_positive(cfg.get("lora_alpha"), f"adapter {name!r}: adapter_config.json 'lora_alpha'", integer=False)
    return cfg


def _check_positive(value, what: str, integer: bool) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float)) and math.isfinite(value)
    if isinstance(value, bool) or not ok or value <= 0:
        raise AdapterError(f"{what} must be a positive {'integer' if integer else 'finite number'}, got {value!r}")


MAX_PATTERNS = 1024  # a real adapter has at most one key per adapted module
MAX_PATTERN_CHARS = 512
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad key is answered, not logged to stderr by the C++ library


class _Patterns:
    """PEFT's `rank_pattern` / `alpha_pattern`: the first key (in file order) whose regex matches the end of a module
    path (`(.*\\.)?(key)$`, as PEFT's `get_pattern_key` does) gives that module its value."""

    def __init__(self, cfg: dict, key: str, name: str, integer: bool) -> None:
        patterns = cfg.get(key) or {}
        what = f"adapter {name!r}: adapter_config.json {key!r}"
        if not isinstance(patterns, dict):
            raise AdapterError(f"{what} must be an object of regex -> value")
        if len(patterns) > MAX_PATTERNS:
            raise AdapterError(f"{what} has {len(patterns)} keys, over the limit of {MAX_PATTERNS}")
        self.rules = []
        for pattern, value in patterns.items():
            if len(pattern) > MAX_PATTERN_CHARS:
                raise AdapterError(f"{what} has a key of {len(pattern)} characters, over {MAX_PATTERN_CHARS}")
            _check_positive(value, f"{what}[{pattern!r}]", integer)
            try:
                self.rules.append((re2.compile(rf"(.*\.)?({pattern})$", _RE2_OPTIONS), value))
            except re2.error as e:
                reason = e.args[0].decode(errors="replace") if e.args and isinstance(e.args[0], bytes) else str(e)
                raise AdapterError(f"{what} key {pattern!r} is not a regex RE2 accepts: {reason}") from e

    def get(self, module: str, default):
        return next((value for regex, value in self.rules if regex.match(module)), default)


def _read_tensors(d: Path, name: str) -> dict[str, torch.Tensor]:
    st, pt = d / "adapter_model.safetensors", d / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(st)
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt files raise many types (SafetensorError, UnpicklingError, RuntimeError)
        raise AdapterError(f"adapter {name!r}: corrupt adapter weights ({type(e).__name__}: {e})") from e
    raise AdapterError(f"adapter {name!r}: {d} has neither adapter_model.safetensors nor adapter_model.bin")


def check_adapter_dir(name: str, path: str | Path, max_rank: int) -> None:
    """The cheap part of `load_adapter`, for start-up before the model loads: the directory, a readable config of a
    servable kind and rank, and a weights file."""
    d = Path(path)
    if not d.is_dir():
        raise AdapterError(f"adapter {name!r}: directory not found: {d}")
    cfg = _read_config(d, name)
    ranks = [cfg["r"], *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {max(ranks)} exceeds --max-lora-rank {max_rank}")
    if not any((d / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
        raise AdapterError(f"adapter {name!r}: {d} has neither adapter_model.safetensors nor adapter_model.bin")


def load_adapter(
    name: str, path: str | Path, model: nn.Module, mapper: WeightMapper, max_rank: int, dtype: torch.dtype
) -> LoRAAdapter:
    try:
        d = Path(check_path(path, "adapter path"))
    except ValueError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from e
    if not d.is_dir():
        raise AdapterError(f"adapter {name!r}: directory not found: {d}")
    cfg = _read_config(d, name)
    ranks = _Patterns(cfg, "rank_pattern", name, integer=True)
    alphas = _Patterns(cfg, "alpha_pattern", name, integer=False)
    tensors = _read_tensors(d, name)
    if not tensors:
        raise AdapterError(f"adapter {name!r}: adapter weights are empty")
    if cfg["r"] > max_rank:
        raise AdapterError(f"adapter {name!r}: rank {cfg['r']} exceeds max_lora_rank={max_rank}")
    use_rslora = bool(cfg.get("use_rslora", False))

    def scale(alpha: float, r: int) -> float:
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    adapter_scale = scale(cfg["lora_alpha"], cfg["r"])
    f32 = torch.finfo(torch.float32)  # the slot scales are float32, and every module's scale is divided by it
    if not f32.tiny <= adapter_scale <= f32.max:
        raise AdapterError(f"adapter {name!r}: the scale lora_alpha / r = {adapter_scale} is out of float32's range")
    modules = dict(model.named_modules())
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise AdapterError(f"adapter {name!r}: unsupported weight {key!r} (only lora_A/lora_B of linear layers)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    weights: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor]] = {}
    unknown: list[str] = []
    rank = 0
    for module_name, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: module {module_name} has lora_{next(iter(ab))} but not its pair")
        target, shard = mapper.module_of(module_name)
        layer = modules.get(target)
        if not isinstance(layer, LoRALinear):
            unknown.append(module_name)
            continue
        # A conv LoRA on a patch embedding (stride = kernel) is a linear LoRA on flattened patches.
        a, b = (t.flatten(1) if t.dim() > 2 else t for t in (ab["A"], ab["B"]))
        out, width = layer.full_shape(shard)  # the whole layer's, even where this process holds a share of it
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != r:
            raise AdapterError(
                f"adapter {name!r}: {module_name} has inconsistent A {tuple(a.shape)} / B {tuple(b.shape)}"
            )
        if a.shape[1] != width or b.shape[0] != out:
            raise AdapterError(
                f"adapter {name!r}: {module_name} expects A [r, {width}] and B [{out}, r] but has "
                f"A {tuple(a.shape)} and B {tuple(b.shape)}; was it trained for another base model?"
            )
        if r > max_rank:
            raise AdapterError(f"adapter {name!r}: rank {r} of {module_name} exceeds max_lora_rank={max_rank}")
        declared = ranks.get(module_name, cfg["r"])
        if r != declared:
            raise AdapterError(f"adapter {name!r}: {module_name} has rank {r} but adapter_config.json says {declared}")
        alpha = alphas.get(module_name, cfg["lora_alpha"])
        ratio = scale(alpha, r) / adapter_scale
        b = b.float() * ratio if ratio != 1.0 else b
        a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: {module_name} has NaN or infinite weights (in {dtype}, scaled)")
        weights[(target, shard)] = (a, b)
        rank = max(rank, r)
    if unknown:
        raise AdapterError(
            f"adapter {name!r}: targets modules the model does not have or cannot adapt: {', '.join(unknown[:6])}"
            + (" ..." if len(unknown) > 6 else "")
        )
    return LoRAAdapter(name, str(d), rank, adapter_scale, weights, tuple(sorted({t for t, _ in weights})))
