"""Image embeddings by content, so a repeated frame (video analytics sends many) is encoded once.

The key is the hash of the processor's pixel tensors plus the identity of the request's adapter when that adapter
changes the vision tower or projector (its embeddings differ); otherwise every adapter shares the base embedding.
The cache is an LRU bounded in bytes of device memory.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import torch


class EmbeddingCache:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = capacity_bytes
        self.used = 0
        self.entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def __contains__(self, key: Hashable) -> bool:
        """A look that neither counts as a hit or miss nor refreshes the entry (the scheduler's, planning a step)."""
        return key in self.entries

    def get(self, key: Hashable) -> torch.Tensor | None:
        emb = self.entries.get(key)
        if emb is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return emb

    def put(self, key: Hashable, emb: torch.Tensor) -> None:
        size = emb.numel() * emb.element_size()
        if size > self.capacity or key in self.entries:
            return
        self.entries[key] = emb
        self.used += size
        while self.used > self.capacity:
            _, old = self.entries.popitem(last=False)
            self.used -= old.numel() * old.element_size()
