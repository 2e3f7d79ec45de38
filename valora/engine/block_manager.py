"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow, returned when they end."""

from __future__ import annotations

from collections import deque

from valora.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def extra_blocks(self, seq: Sequence) -> int:
        """Blocks `seq` still needs so that all of its current tokens have a KV slot."""
        return max(0, self.blocks_for(len(seq)) - len(seq.block_table))

    def can_grow(self, seq: Sequence) -> bool:
        return self.extra_blocks(seq) <= len(self.free_blocks)

    def grow(self, seq: Sequence) -> None:
        for _ in range(self.extra_blocks(seq)):
            seq.block_table.append(self.free_blocks.popleft())

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0

    def slot(self, seq: Sequence, i: int) -> int:
        return seq.block_table[i // self.block_size] * self.block_size + i % self.block_size

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks if self.num_blocks else 0.0
