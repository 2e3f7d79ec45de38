"""The tensor-parallel layers over two gloo processes equal the whole layer on one: column and row linears with
adapters of different ranks per token (unmerged, merged and mixture), KV heads fewer than ranks, the vocabulary."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from valora.distributed.state import destroy_tensor_parallel, init_tensor_parallel
from valora.lora.ops.batch import LoRABatch
from valora.models.layers.linear import LoRALinear
from valora.models.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    head_shard,
)

WORLD = 2
SLOTS, RMAX, TOKENS = 3, 8, 7
SLOT_OF_TOKEN = [0, 1, -1, 2, 0, 1, 2]
RANKS = [8, 4, 2]


def _adapted(layer: LoRALinear, full: LoRALinear, g: torch.Generator) -> None:
    """Random weights and three adapters (ranks 8, 4, 2) written into `full` and, through its own sharding, `layer`."""
    for name, p in full.named_parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
        layer.load_weight(name, p.data.clone())
    scalings = torch.tensor([0.5, 1.0, 2.0])
    for m in (layer, full):
        m.enable_lora(SLOTS, RMAX, scalings, -scalings, "torch")
    for slot, r in enumerate(RANKS):
        for j, width in enumerate(full.out_slices):
            a, b = torch.randn(r, full.in_features, generator=g), torch.randn(width, r, generator=g)
            full.set_slot(slot, j, a, b)
            layer.set_slot(slot, j, a, b)


def _check(layer: LoRALinear, full: LoRALinear, x_local: torch.Tensor, x: torch.Tensor, cols: slice) -> None:
    for merged in (None, 1):  # unmerged; merged adapter 1 with the others as mixture corrections
        for m in (layer, full):
            if merged is None:
                m.merged_slot = None
            else:
                m.merge(merged, [RANKS[merged]] * m.num_slices, [0.5, 1.0, 2.0][merged])
        lora = LoRABatch.build(SLOT_OF_TOKEN, merged, "cpu")
        torch.testing.assert_close(layer(x_local, lora), full(x, lora)[:, cols], rtol=1e-4, atol=1e-4)


def _worker(rank: int, rendezvous: str) -> None:
    init_tensor_parallel(rank, WORLD, rendezvous, "gloo")
    torch.set_default_dtype(torch.float64)
    g = torch.Generator().manual_seed(0)
    hidden, heads, kv_heads, head_dim, inter = 16, 4, 1, 4, 24
    x = torch.randn(TOKENS, hidden, generator=g)

    # q/k/v: 4 query heads split, 1 KV head shared by both ranks
    q_rows, kv_rows = head_shard_of(heads, head_dim), head_shard_of(kv_heads, head_dim)
    sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    qkv = ColumnParallelLinear(hidden, sizes, bias=True, shards=(q_rows, kv_rows, kv_rows))
    full = LoRALinear(hidden, sizes, bias=True)
    _adapted(qkv, full, g)
    out_rows = torch.cat([torch.arange(off + s, off + s + n) for off, (s, n) in
                          zip((0, sizes[0], sizes[0] + sizes[1]), (q_rows, kv_rows, kv_rows))])
    _check(qkv, full, x, x, out_rows)

    # gate/up, then down: the column layer's output is the row layer's input
    gate_up = ColumnParallelLinear(hidden, (inter, inter))
    down = RowParallelLinear(inter, hidden, bias=True)
    full_down = LoRALinear(inter, hidden, bias=True)
    _adapted(down, full_down, g)
    h = torch.randn(TOKENS, inter, generator=g)
    _check(down, full_down, h[:, slice(*_span(down.shard))], h, slice(None))
    assert gate_up.out_slices == (inter // WORLD, inter // WORLD)

    # vocabulary of 11 (not a multiple of 2: the last rank's rows are padded)
    table = torch.randn(11, hidden, generator=g)
    embed, head = VocabParallelEmbedding(11, hidden), ParallelLMHead(11, hidden)
    embed.load_weight("weight", table)
    head.load_weight("weight", table)
    ids = torch.tensor([0, 5, 6, 10, 3])
    torch.testing.assert_close(embed(ids), table[ids])
    torch.testing.assert_close(head(x), x @ table.t())
    destroy_tensor_parallel()


def head_shard_of(heads: int, head_dim: int) -> tuple[int, int]:
    from valora.distributed.state import tp

    return head_shard(tp(), heads, head_dim)


def _span(shard: tuple[int, int]) -> tuple[int, int]:
    return shard[0], shard[0] + shard[1]


def test_parallel_layers_equal_the_whole_layer(tmp_path):
    mp.spawn(_worker, args=(f"file://{tmp_path}/rendezvous",), nprocs=WORLD, join=True)
