"""`LoRARequest(name, int_id, path)`: which adapter a request uses, as in vLLM's offline API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not self.lora_name:
            raise ValueError("LoRARequest needs a non-empty lora_name")
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1 (got {self.lora_int_id})")
