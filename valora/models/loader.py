"""Read Hugging Face checkpoints (sharded safetensors or .bin) into our module tree.

Each family declares how checkpoint names map onto its modules: regex renames (legacy layouts), and which
leaf projections are packed into fused layers. The same mapping resolves PEFT adapter keys, so adapters and
weights can never disagree about where a module lives.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from valora.errors import UserError
from valora.models.layers.linear import LoRALinear
from valora.models.layers.parallel import VocabParallelEmbedding


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    d = Path(model_dir)
    index = d / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if files:  # a progress bar on a terminal (disable=None: none in logs and pipes)
        for fname in tqdm(files, desc="Loading safetensors shards", unit="shard", disable=None):
            with safe_open(d / fname, framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield key, f.get_tensor(key)
        return
    bins = sorted(d.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {d}")
    for path in tqdm(bins, desc="Loading checkpoint shards", unit="shard", disable=None):
        yield from torch.load(path, map_location="cpu", weights_only=True).items()


@dataclass(frozen=True)
class WeightMapper:
    """Checkpoint name -> (module path, parameter leaf, output slice of a fused layer or None)."""

    renames: tuple[tuple[str, str], ...] = ()
    packed: dict[str, tuple[str, int]] = field(default_factory=dict)  # leaf -> (fused leaf, slice)
    ignore: tuple[str, ...] = ()  # regexes of checkpoint names that carry nothing we use

    def normalise(self, name: str) -> str:
        for pattern, repl in self.renames:
            name = re.sub(pattern, repl, name)
        return name

    def module_of(self, module_name: str) -> tuple[str, int | None]:
        """A checkpoint *module* path (no parameter leaf) -> our module path and slice."""
        path = self.normalise(module_name)
        parent, _, leaf = path.rpartition(".")
        if leaf in self.packed:
            fused, shard = self.packed[leaf]
            return f"{parent}.{fused}" if parent else fused, shard
        return path, None

    def ignored(self, name: str) -> bool:
        return any(re.search(p, name) for p in self.ignore)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]], mapper: WeightMapper,
                 tied: dict[str, str] | None = None) -> None:
    """Copy every checkpoint tensor into place; fail loudly on unknown, missing or mis-shaped weights."""
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    partial: dict[str, set[int]] = {}  # fused parameter -> slices loaded so far
    unexpected: list[str] = []
    for name, tensor in weights:
        if mapper.ignored(name):
            continue
        module_name, _, leaf = name.rpartition(".")
        path, shard = mapper.module_of(module_name)
        module = modules.get(path)
        if module is None or not hasattr(module, leaf):
            unexpected.append(name)
            continue
        with torch.no_grad():
            if isinstance(module, LoRALinear | VocabParallelEmbedding):  # they keep their tensor-parallel share
                module.load_weight(leaf, tensor, shard)
            else:
                param = getattr(module, leaf)
                if tuple(param.shape) != tuple(tensor.shape):
                    raise UserError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(param.shape)}")
                param.data.copy_(tensor)
        key = f"{path}.{leaf}"
        if shard is None:
            loaded.add(key)
        else:
            partial.setdefault(key, set()).add(shard)
            if len(partial[key]) == module.num_slices:
                loaded.add(key)
    for dst, src in (tied or {}).items():
        if dst not in loaded and src in loaded:
            params[dst].data.copy_(params[src].data)
            loaded.add(dst)
    if unexpected:
        raise UserError(f"checkpoint has {len(unexpected)} weights this model does not know, e.g. {unexpected[:5]}")
    missing = sorted(set(params) - loaded)
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:5]}")


def build_model(family, hf_config, model_dir: str | Path, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The family's model in `dtype` on `device` with the checkpoint's weights (under tensor parallelism, this
    rank's share of them)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = family.model_cls(hf_config)
    finally:
        torch.set_default_dtype(default)
    model.load_weights(iter_checkpoint(model_dir))
    return model.eval()
