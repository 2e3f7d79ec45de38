"""`LoRARequest(name, int_id, path)`: which adapter a request uses, as in vLLM's offline API."""

from __future__ import annotations

import re
from dataclasses import dataclass

from valora.paths import check_path

# Adapter names travel in URLs, logs, metrics labels and the `model` field (where `base:adapter` is split at ':'),
# so they are kept to a plain, bounded set; the server documents the same rule.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$"
ADAPTER_NAME_RULE = "1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
_NAME = re.compile(ADAPTER_NAME_PATTERN)


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        check_adapter_name(self.lora_name)
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1 (got {self.lora_int_id})")
        check_path(self.lora_path, "lora_path")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"lora_name must be {ADAPTER_NAME_RULE}")
