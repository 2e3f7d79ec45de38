"""Reference backend: a plain loop over adapter segments, obviously correct, used to check the others."""

from __future__ import annotations

from valora.lora.ops.meta import LoRAMeta


def lora_torch(x, meta: LoRAMeta, stack_a, stack_b, ranks, scalings, slices, out) -> None:
    """Adds each segment's delta into `out` in place; ranks are honoured exactly (no padding in the math)."""
    if meta.sizes is not None:
        raise ValueError("this backend needs the host layout; CUDA graphs run atmm, sgmv, bgmv or gather")
    host_ranks = ranks.tolist()
    host_scale = scalings.tolist()
    rmax = stack_b.shape[2]
    starts = meta.host_seg_starts
    for s, slot in enumerate(meta.host_seg_slots):
        rows = meta.token_order[starts[s] : starts[s + 1]]
        xs = x.index_select(0, rows).float()
        col = 0
        for j, width in enumerate(slices):
            r = host_ranks[j][slot]
            if r > 0:
                a = stack_a[slot, j * rmax : j * rmax + r].float()  # [r, K]
                b = stack_b[slot, col : col + width, :r].float()  # [width, r]
                delta = (xs @ a.t()) @ b.t() * host_scale[slot]
                out[rows, col : col + width] += delta.to(out.dtype)
            col += width
