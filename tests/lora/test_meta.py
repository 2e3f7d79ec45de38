"""LoRAMeta: segments, exact tile maps and the shared scratch buffer."""

from __future__ import annotations

import torch

from valora.lora.ops.meta import TILE_HEIGHTS, LoRAMeta


def test_segments_group_tokens_by_slot_and_skip_no_adapter() -> None:
    meta = LoRAMeta.build([3, -1, 0, 3, 3, -1, 0, 7])
    assert meta.host_seg_slots == (0, 3, 7)
    assert meta.host_seg_starts == (0, 2, 5, 6)
    assert meta.token_order.tolist() == [2, 6, 0, 3, 4, 7]
    assert meta.num_lora_tokens == 6 and meta.num_tokens == 8 and meta.max_segment_len == 3
    assert LoRAMeta.build([-1, -1]).empty


def test_tile_maps_cover_every_segment_exactly_once() -> None:
    ids = [5] * 37 + [-1] * 4 + [2] * 3 + [9] * 130
    meta = LoRAMeta.build(ids)
    starts = meta.host_seg_starts
    for bm in TILE_HEIGHTS:
        seg, row, count = meta.tile_maps[bm]
        assert seg.storage_offset() % 4 == 0  # 16-byte aligned: one compiled pointer variant
        covered = []
        for s, r in zip(seg[:count].tolist(), row[:count].tolist()):
            assert starts[s] <= r < starts[s + 1]
            covered += range(r, min(r + bm, starts[s + 1]))
        assert covered == list(range(meta.num_lora_tokens))


def test_scratch_is_shared_and_grows() -> None:
    meta = LoRAMeta.build([0, 1])
    a = meta.scratch(10, torch.float32, torch.device("cpu"))
    b = meta.scratch(6, torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.numel() == 6
    c = meta.scratch(100, torch.float32, torch.device("cpu"))
    assert c.numel() == 100
