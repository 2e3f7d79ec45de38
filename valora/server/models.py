"""What the server answers for: the base model under its served names, and the adapters loaded by name.

The OpenAI `model` field picks one: a served name (or `""`) is the base model, an adapter name is that
adapter, and `base:adapter` (SGLang's spelling) is accepted too. Runtime loads are confined to `lora_root`
when one is given: no `..`, and no symlink that leads out of it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from valora.engine.core_host import AdapterEvent
from valora.heads.artifact import HeadNames
from valora.lora.request import LoRARequest, check_adapter_name
from valora.paths import check_path
from valora.server.errors import bad_request, not_found
from valora.server.protocol import MODEL_NAME_MAX, MODEL_NAME_PATTERN, ModelCard, ModelList


@dataclass
class ServedModels:
    names: list[str]  # served names of the base model; the first is the one reported
    root: str  # where the base model was loaded from
    max_model_len: int
    lora_root: Path | None = None
    adapters: dict[str, LoRARequest] = field(default_factory=dict)  # a mirror of the engine core's
    heads: dict[str, HeadNames] = field(default_factory=dict)  # of the adapters that have heads
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        for name in self.names:  # each must be one a request can send in `model`
            if not name or len(name) > MODEL_NAME_MAX or not re.fullmatch(MODEL_NAME_PATTERN, name):
                raise ValueError(f"served model name {name!r} must be 1 to {MODEL_NAME_MAX} printable characters")

    @property
    def name(self) -> str:
        return self.names[0]

    def resolve(self, model: str) -> LoRARequest | None:
        """The adapter a request's `model` names, or None for the base model; unknown names are a 404."""
        if model in self.names or model == "":
            return None
        if model in self.adapters:
            return self.adapters[model]
        base, sep, adapter = model.partition(":")
        if sep and base in self.names and adapter in self.adapters:
            return self.adapters[adapter]
        raise not_found(f"The model `{model}` does not exist; GET /v1/models lists the base model and adapters",
                        "model_not_found", "model")

    def apply(self, event: AdapterEvent) -> None:
        """Mirror a load or unload of the engine core (the single source of truth for adapters: it tells every
        front end of each change, so a request resolved here may still find its adapter gone in the core, which
        then refuses it with a 404 before the response starts)."""
        if event.lora is None:
            self.adapters.pop(event.name, None)
            self.heads.pop(event.name, None)
            return
        self.adapters[event.name] = event.lora
        if event.heads is not None:
            self.heads[event.name] = event.heads

    def resolvable(self, name: str) -> LoRARequest | None:
        """For adapters on first use: the adapter `name` would be as the directory `lora_root/name`, when the name
        is a valid adapter name (so no path separators or '..') and that directory holds a PEFT config."""
        if self.lora_root is None or name in self.names or name in self.adapters:
            return None
        try:
            check_adapter_name(name)
        except ValueError:
            return None
        if name in (".", "..") or not (self.lora_root / name / "adapter_config.json").is_file():
            return None
        return self.new_adapter(name, name)

    def new_adapter(self, name: str, path: str, confine: bool = True) -> LoRARequest:
        """A request for a new adapter (not yet loaded; the core assigns the id it serves under): the name must be
        free and, when `confine` is set and a `lora_root` exists, the path must stay inside it."""
        try:
            check_adapter_name(name)
        except ValueError as e:
            raise bad_request(str(e), "invalid_value", "lora_name") from e
        if name in self.names or name in self.adapters:
            raise bad_request(f"The name `{name}` is already in use; unload the adapter first", "adapter_exists",
                              "lora_name")
        if confine and self.lora_root is not None:
            path = self._inside_root(path)
        return LoRARequest(name, next(self._ids), _checked(path))

    def _inside_root(self, path: str) -> str:
        root = self.lora_root.resolve()
        p = Path(_checked(path))
        if ".." in p.parts:
            raise bad_request("lora_path must not contain '..'", "invalid_lora_path", "lora_path")
        resolved = Path(_checked(p if p.is_absolute() else root / p)).resolve()
        outside = not resolved.is_relative_to(root)
        if not outside and resolved.is_dir():
            outside = any(not f.resolve().is_relative_to(root) for f in resolved.iterdir())
        if outside:
            raise bad_request(f"lora_path must lie inside the adapter root {root} (symlinks out are refused)",
                              "invalid_lora_path", "lora_path")
        return str(resolved)

    def cards(self) -> ModelList:
        base = [ModelCard(id=n, root=self.root, max_model_len=self.max_model_len) for n in self.names]
        loras = [ModelCard(id=n, root=r.lora_path, parent=self.name) for n, r in self.adapters.items()]
        return ModelList(data=base + loras)


def _checked(path: str | Path) -> str:
    """Refused before any filesystem call: NUL bytes, paths or components over the kernel's limits."""
    try:
        return check_path(path, "lora_path")
    except ValueError as e:
        raise bad_request(str(e), "invalid_lora_path", "lora_path") from e
