"""Paged KV cache bookkeeping: fixed-size blocks handed to sequences as they grow, returned when they end.

With prefix caching, every full block a sequence computes is registered under a hash of everything its KV depends
on (`block_hashes`), and a block keeps its contents after its last user frees it: it waits in an LRU of evictable
blocks, and a later request whose prefix hashes the same shares it (reference counts) instead of recomputing it.
Blocks are only taken from that LRU, least recently used first, once no block without cached contents is left.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from valora.engine.sequence import Sequence

_ROOT = bytes(16)  # the parent hash of a sequence's first block


def block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> list[bytes]:
    """Hashes of the first `num_blocks` full blocks of `seq`, each over its parent's hash, its token ids, the
    adapter's registration (name and load version) and the content hashes of the images whose placeholder tokens
    fall in the block. The image hashes cover the pixels and the grid, so the M-RoPE positions of the tokens that
    follow are covered by the chain; an adapter that changes the vision tower changes its own key. Computed once
    per block and kept on the sequence (its tokens never change, preempted or not)."""
    hashes = seq.block_hashes
    while len(hashes) < num_blocks:
        lo = len(hashes) * block_size
        hi = lo + block_size
        h = hashlib.blake2b(hashes[-1] if hashes else _ROOT, digest_size=16)
        h.update(array("q", seq.token_range(lo, hi)).tobytes())
        extra = [seq.adapter_key or ""]
        extra += [img.content_hash for img in seq.prompt.images if img.offset < hi and img.offset + img.num_tokens > lo]
        h.update("\0".join(extra).encode())
        hashes.append(h.digest())
    return hashes[:num_blocks]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching = enable_caching
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unreferenced, nothing worth keeping
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, least recent first
        self.refs = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # block hash -> block holding that KV

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq` (which holds no blocks yet). The last token is never
        among them: it must be computed for its logits (or a head's hidden state)."""
        if not self.enable_caching:
            return []
        hits = []
        for h in block_hashes(seq, self.block_size, (len(seq) - 1) // self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_blocks(self, seq: Sequence) -> None:
        """Offer the blocks `seq` has fully computed to the cache. A block whose hash another one already holds (two
        requests computed the same prefix at once) stays private and is simply freed later."""
        if not self.enable_caching:
            return
        full = seq.num_computed // self.block_size
        if full <= seq.num_cached_blocks:
            return
        hashes = block_hashes(seq, self.block_size, full)
        for i in range(seq.num_cached_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_cached_blocks = full

    # -- allocation ---------------------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> bool:
        """Whether `seq` can hold KV for its first `num_tokens` tokens, starting from the cached `prefix` blocks
        when it holds none yet (shared blocks that nobody referenced leave the free pool)."""
        prefix = prefix or []
        new = max(0, self.blocks_for(num_tokens) - len(seq.block_table) - len(prefix))
        return new + sum(1 for b in prefix if self.refs[b] == 0) <= self.num_free

    def allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] | None = None) -> None:
        """Give `seq` KV blocks for its first `num_tokens` tokens (`can_allocate` said yes)."""
        for block in prefix or []:
            if self.refs[block] == 0:
                del self.evictable[block]
            self.refs[block] += 1
            seq.block_table.append(block)
            seq.num_cached_blocks += 1
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            seq.block_table.append(self._take())

    def _take(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:  # reuse the least recently used cached block: its contents are forgotten
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = None
        self.refs[block] = 1
        return block

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references. Its last blocks go first into the LRU, so they are evicted before the shared
        beginning (a system prompt) that other requests are likelier to reuse."""
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if self.block_hash[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_cached_blocks = 0

    def slot(self, seq: Sequence, i: int) -> int:
        return seq.block_table[i // self.block_size] * self.block_size + i % self.block_size

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: free ones and cached ones nobody references."""
        return len(self.free_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks if self.num_blocks else 0.0
