"""Heads on disk, beside the PEFT files of the adapter they were trained with:

    ADAPTER_DIR/heads.json          {"format": "valora-heads", "version": 1, "default": NAME or null,
                                     "heads": [{"name", "kind": "classify"|"box", "hidden_size", "width",
                                                "labels": [...]}, ...]}
    ADAPTER_DIR/heads.safetensors   float32 tensors "<name>.mlp.0.weight" [width, hidden_size], "<name>.mlp.0.bias",
                                    "<name>.mlp.2.weight" [classes or 4, width], "<name>.mlp.2.bias"

`default` is the head that answers chat requests which name none (the builder sets it when the adapter's only
task is that head's); PEFT ignores both files, so the directory still loads anywhere a PEFT adapter does.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from valora.heads.modules import HeadConfig, TaskHead
from valora.lora.adapter import AdapterError

CONFIG, WEIGHTS = "heads.json", "heads.safetensors"
FORMAT, VERSION = "valora-heads", 1
NAME = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class HeadNames:
    """Which heads an adapter has and which is its default: all a front end needs to route and check requests
    (the heads' weights stay with the engine core)."""

    names: tuple[str, ...]
    default: str | None = None

    def resolve(self, name: str | None) -> str:
        """The head a request gets: the one it names, else the default one, else the only one."""
        if name is not None:
            if name not in self.names:
                raise KeyError(f"no head {name!r}; this adapter has {', '.join(sorted(self.names))}")
            return name
        if self.default is not None:
            return self.default
        if len(self.names) == 1:
            return self.names[0]
        raise KeyError(f"this adapter has several heads ({', '.join(sorted(self.names))}): name one")


@dataclass
class HeadSet:
    heads: dict[str, TaskHead]
    default: str | None = None

    @property
    def names(self) -> HeadNames:
        return HeadNames(tuple(self.heads), self.default)

    def resolve(self, name: str | None) -> str:
        return self.names.resolve(name)


def save_heads(out_dir: str | Path, heads: dict[str, TaskHead], default: str | None = None) -> None:
    from safetensors.torch import save_file

    if default is not None and default not in heads:
        raise ValueError(f"default head {default!r} is not one of {sorted(heads)}")
    out = Path(out_dir)
    meta = {"format": FORMAT, "version": VERSION, "default": default, "heads": [
        {"name": n, "kind": h.config.kind, "hidden_size": h.config.hidden_size, "width": h.config.width,
         "labels": list(h.config.labels)} for n, h in heads.items()]}
    tensors = {f"{n}.{k}": v.detach().float().cpu().contiguous() for n, h in heads.items()
               for k, v in h.state_dict().items()}
    save_file(tensors, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(meta, indent=2))


def load_heads(name: str, path: str | Path, hidden_size: int, device: torch.device | str = "cpu") -> HeadSet | None:
    """The heads of adapter `name` (None when its directory has none), checked against the served model's width."""
    d = Path(path)
    if not (d / CONFIG).is_file():
        return None
    try:
        meta = json.loads((d / CONFIG).read_text())
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"not a {FORMAT} v{VERSION} file")
        configs = [HeadConfig(h["name"], h["kind"], int(h["hidden_size"]), int(h["width"]), tuple(h["labels"]))
                   for h in meta["heads"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AdapterError(f"adapter {name!r}: corrupt {CONFIG} ({e})") from e
    heads: dict[str, TaskHead] = {}
    for c in configs:
        if not NAME.match(c.name) or c.name in heads:
            raise AdapterError(f"adapter {name!r}: bad or repeated head name {c.name!r} in {CONFIG}")
        if c.hidden_size != hidden_size:
            raise AdapterError(f"adapter {name!r}: head {c.name!r} reads hidden states of width {c.hidden_size} but "
                               f"the model's is {hidden_size}; was it trained for another base model?")
        heads[c.name] = TaskHead(c)
    default = meta.get("default")
    if default is not None and default not in heads:
        raise AdapterError(f"adapter {name!r}: default head {default!r} is not among its heads")
    try:
        from safetensors.torch import load_file

        nn.ModuleDict(heads).load_state_dict(load_file(d / WEIGHTS), strict=True)
    except Exception as e:  # missing file, corrupt file, missing keys or wrong shapes
        raise AdapterError(f"adapter {name!r}: cannot load {WEIGHTS} ({type(e).__name__}: {e})") from e
    for h in heads.values():
        h.to(device).eval().requires_grad_(False)
    return HeadSet(heads, default)
