"""Segment-tiled Triton kernels for the LoRA shrink (x·Aᵀ) and expand (·Bᵀ, added into y), shared by `atmm`
(tile shapes from the tuned table) and `sgmv` (one fixed tile shape, the Punica/S-LoRA prefill grid).

Layout (see `lora_matmul`): the stacked A rows of all slices form one [S*R, K] matrix per slot, row `j*R + r`
being rank row `r` of slice `j`; it is valid only when `r < ranks[j, slot]`. The shrink writes an fp32
intermediate `mid[s, p, j*R + r]` in segment order (`p` indexes `meta.token_order`), one partial sum per split-K
chunk `s`; the expand adds the partials as it reads them. Split-K thus needs no atomics and no zeroing pass (one
launch fewer at decode, and results that do not depend on the order programs finish in). Measured on the H100
against fp32 atomics into one zeroed buffer: atomics were 2-4x slower at 512-2048 tokens under split-K, partials
cost the expand its re-reads when split-K and the output are both large (decode gate_up: 58 vs 41 us).

Ranks are never padded in memory traffic: rows and columns past a slot's rank are masked out of every load
(so garbage there cannot leak), programs whose rank tile holds no valid row exit at once, and the expand loops
over rank only up to the slot's own rank. Grids come from host-side meta only: no device sync.

The fused kernel (`_fused_kernel`) does both in one launch for decode-sized calls: a program takes one row tile of
one segment and one chunk of output columns of one slice, computes its tokens' x·Aᵀ in registers (reading x and
the adapter's A rows once), then walks its chunk of columns adding scaling·(x·Aᵀ)·Bᵀ into y. With several chunks
per slice (`split_n`) the shrink is recomputed per chunk, its A rows then coming from L2: one launch instead of
two, and no intermediate written or re-read.

The row kernels (`_row_shrink_kernel`, `_row_expand_kernel`; a plan whose configs have `block_m == 1`) give every
token its own programs and read its slot from `meta.ids`: no segment tiles, no tile map to read first, and no row
of a tile computed for nothing (decode, where most adapters have one token, fills a 16-row tile with one). They
multiply and sum instead of using tensor-core tiles, and index their intermediate by token instead of by position in
`token_order`, so a plan's two kernels are both row kernels or neither. A row plan may run them as one launch
(`_row_one_launch_kernel`, `Plan.one_launch`): the shrink's programs first, then the expand's, each expand program
issuing its first B and y loads, then waiting on a per-(token, slice) flag in the metadata until every split of
its token's shrink has signalled. At decode, a layer's four LoRA calls are eight launches of a few microseconds
each, and the gap between a call's two kernels, during which the expand's B loads cannot start, is a fixed cost
per call that one launch removes; the tuner times both forms.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from valora.lora.ops.configs import Plan, TileConfig, dot_block_r
from valora.lora.ops.jit import compiling
from valora.lora.ops.meta import LoRAMeta

MAX_SLICES = 3  # fused qkv is the widest projection a model fuses
_FLAGS_PER_TOKEN = tl.constexpr(MAX_SLICES)  # the one-launch row plan's flags: one per (token, slice)


@triton.jit
def _row_tile(pid, tile_seg_ptr, tile_row_ptr, seg_starts_ptr, num_segments, BLOCK_M: tl.constexpr,
              SEG_GRID: tl.constexpr):
    """(segment, first row, end of segment) of row tile `pid`.

    With SEG_GRID every segment gets the same number of tiles (the longest segment's), the Punica/S-LoRA
    grid: tiles past a shorter segment's end are empty. Otherwise tiles come from the exact map in LoRAMeta.
    """
    if SEG_GRID:
        seg = pid % num_segments
        row = tl.load(seg_starts_ptr + seg) + (pid // num_segments) * BLOCK_M
    else:
        seg = tl.load(tile_seg_ptr + pid)
        row = tl.load(tile_row_ptr + pid)
    end = tl.load(seg_starts_ptr + seg + 1)
    return seg, row, end


@triton.jit
def _slice_of(pid_n, w0, w1, w2, tile):
    """Output tile `pid_n` (`tile` columns wide) of up to three fused slices of widths w0, w1, w2
    -> (slice, first col, width, offset)."""
    t0 = tl.cdiv(w0, tile)
    t1 = tl.cdiv(w1, tile)
    in1 = pid_n >= t0
    in2 = pid_n >= t0 + t1
    j = in1.to(tl.int32) + in2.to(tl.int32)
    first = (pid_n - tl.where(in2, t0 + t1, tl.where(in1, t0, 0))) * tile
    width = tl.where(in2, w2, tl.where(in1, w1, w0))
    offset = tl.where(in2, w0 + w1, tl.where(in1, w0, 0))
    return j, first, width, offset


# The segment count changes from step to step, so it is not specialised on (divisibility by 16, equality to 1):
# one compiled variant serves every step. Sizes and strides stay specialised: knowing them divisible by 16 is what
# lets masked loads along K and along the output width vectorise.
@triton.jit(do_not_specialize=["num_segments"])
def _shrink_kernel(
    x_ptr, a_ptr, mid_ptr, ranks_ptr, order_ptr, seg_slots_ptr, seg_starts_ptr, tile_seg_ptr, tile_row_ptr,
    num_segments, K, R, rows, k_per_split,
    stride_xm, stride_aslot, stride_arow, stride_msplit, stride_mid, stride_rank,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG_GRID: tl.constexpr,
):
    # Rank tiles vary fastest, so the programs that share a tile of x run together and read it from L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    seg, row0, end = _row_tile(pid_m, tile_seg_ptr, tile_row_ptr, seg_starts_ptr, num_segments, BLOCK_M, SEG_GRID)
    if row0 >= end:
        return
    slot = tl.load(seg_slots_ptr + seg)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # stacked A rows
    rank = tl.load(ranks_ptr + (offs_n // R) * stride_rank + slot, mask=offs_n < rows, other=0)
    n_ok = (offs_n % R) < rank
    if tl.max(n_ok.to(tl.int32), axis=0) == 0:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    tok = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    x_rows = x_ptr + tok[:, None] * stride_xm
    a_rows = a_ptr + slot.to(tl.int64) * stride_aslot + offs_n[:, None] * stride_arow
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < k_hi
        xt = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows + offs_k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(xt, tl.trans(at))
    out = mid_ptr + pid_k * stride_msplit + offs_m[:, None] * stride_mid + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_segments"])
def _expand_kernel(
    mid_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, order_ptr, seg_slots_ptr, seg_starts_ptr, tile_seg_ptr, tile_row_ptr,
    num_segments, R, w0, w1, w2, num_splits,
    stride_msplit, stride_mid, stride_bslot, stride_brow, stride_ym, stride_rank,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEG_GRID: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    seg, row0, end = _row_tile(pid_m, tile_seg_ptr, tile_row_ptr, seg_starts_ptr, num_segments, BLOCK_M, SEG_GRID)
    if row0 >= end:
        return
    j, first, width, offset = _slice_of(pid_n, w0, w1, w2, BLOCK_N)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + j * stride_rank + slot)
    if rank == 0:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    cols = first + tl.arange(0, BLOCK_N)
    c_ok = cols < width
    mid_rows = mid_ptr + offs_m[:, None] * stride_mid + j * R
    b_rows = b_ptr + slot.to(tl.int64) * stride_bslot + (offset + cols)[:, None] * stride_brow
    tok = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    y = y_ptr + tok[:, None] * stride_ym + (offset + cols)[None, :]
    mask = m_ok[:, None] & c_ok[None, :]
    prev = tl.load(y, mask=mask, other=0.0)  # issued before the rank loop, so its latency overlaps the dots
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Loads cover the rank rounded up to 8 (inside the stack), so they stay 16-byte vectors for any rank; the
    # columns past the rank are then zeroed with `where`, which also drops any garbage (NaN) they hold.
    rank8 = tl.minimum(tl.cdiv(rank, 8) * 8, R)
    for r in range(0, rank, BLOCK_K):
        offs_r = r + tl.arange(0, BLOCK_K)
        r_ok = offs_r < rank
        r_ld = offs_r < rank8
        mt = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for s in range(num_splits):
            mt += tl.load(mid_rows + s * stride_msplit + offs_r[None, :], mask=m_ok[:, None] & r_ld[None, :], other=0.0)
        bt = tl.load(b_rows + offs_r[None, :], mask=c_ok[:, None] & r_ld[None, :], other=0.0)
        mt = tl.where(r_ok[None, :], mt, 0.0)
        bt = tl.where(r_ok[None, :], bt, 0.0)
        acc += tl.dot(mt.to(bt.dtype), tl.trans(bt))
    scale = tl.load(scal_ptr + slot)
    tl.store(y, (prev.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_segments"])
def _fused_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, ranks_ptr, scal_ptr, order_ptr, seg_slots_ptr, seg_starts_ptr, tile_seg_ptr,
    tile_row_ptr, num_segments, K, R, w0, w1, w2, cols,
    stride_xm, stride_aslot, stride_arow, stride_bslot, stride_brow, stride_ym, stride_rank,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Column chunks vary fastest, so the programs of one row tile (one adapter's A, the same x) run together and
    # the A rows that every chunk re-reads come from L2.
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    seg, row0, end = _row_tile(pid_m, tile_seg_ptr, tile_row_ptr, seg_starts_ptr, num_segments, BLOCK_M, False)
    if row0 >= end:
        return
    j, first, width, offset = _slice_of(pid_n, w0, w1, w2, cols)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + j * stride_rank + slot)
    if rank == 0:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_ok = offs_m < end
    tok = tl.load(order_ptr + offs_m, mask=m_ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rank
    # Shrink: xa[m, r] = x[tok[m]] · A[slot][j*R + r] for r < rank (rows past the rank load as zeros).
    x_rows = x_ptr + tok[:, None] * stride_xm
    a_rows = a_ptr + slot.to(tl.int64) * stride_aslot + (j * R + offs_r)[:, None] * stride_arow
    xa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        xa += tl.dot(xt, tl.trans(at))
    # Expand over this program's columns. B loads cover the rank rounded up to 8 (16-byte vectors); the columns
    # past the rank are zeroed with `where`, which also drops any garbage (NaN) they hold.
    r_ld = offs_r < tl.minimum(tl.cdiv(rank, 8) * 8, R)
    b_rows = b_ptr + slot.to(tl.int64) * stride_bslot + offset * stride_brow + offs_r[None, :]
    y_rows = y_ptr + tok[:, None] * stride_ym + offset
    xa = xa.to(b_ptr.dtype.element_ty)
    scale = tl.load(scal_ptr + slot)
    hi = tl.minimum(first + cols, width)
    for n in range(first, hi, BLOCK_N):
        c = n + tl.arange(0, BLOCK_N)
        c_ok = c < hi
        mask = m_ok[:, None] & c_ok[None, :]
        prev = tl.load(y_rows + c[None, :], mask=mask, other=0.0)
        bt = tl.load(b_rows + c[:, None] * stride_brow, mask=c_ok[:, None] & r_ld[None, :], other=0.0)
        bt = tl.where(r_ok[None, :], bt, 0.0)
        acc = tl.dot(xa, tl.trans(bt))
        tl.store(y_rows + c[None, :], (prev.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def token_adapter(ids_ptr, ranks_ptr, t, j, stride_rank):
    """(slot, rank on slice j) of token t; rank 0 for a token without an adapter (slot -1)."""
    slot = tl.load(ids_ptr + t)
    rank = tl.load(ranks_ptr + j * stride_rank + slot, mask=slot >= 0, other=0)
    return slot, rank


@triton.jit
def _row_shrink(
    pid_k, t, j, x_ptr, a_ptr, mid_ptr, ids_ptr, ranks_ptr, flags_ptr, K, R, k_per_split,
    stride_xm, stride_aslot, stride_arow, stride_msplit, stride_mid, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SIGNAL: tl.constexpr,
):
    # mid[split, t, j*R + r] = x[t] · A[slot][j*R + r] over the split's K, r < rank; with SIGNAL, then one more on
    # flags[t, j] (its stores released first), which the one-launch expand of (t, j) waits for.
    slot, rank = token_adapter(ids_ptr, ranks_ptr, t, j, stride_rank)
    if rank > 0:
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < rank
        a_rows = a_ptr + slot.to(tl.int64) * stride_aslot + (j * R + offs_r)[:, None] * stride_arow
        x_row = x_ptr + t.to(tl.int64) * stride_xm
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k in range(k_lo, k_hi, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < k_hi
            xt = tl.load(x_row + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            at = tl.load(a_rows + offs_k[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(at * xt[None, :], axis=1)
        tl.store(mid_ptr + pid_k * stride_msplit + t * stride_mid + j * R + offs_r, acc, mask=r_ok)
        if SIGNAL:  # every thread's stores done before the one atomic (a scalar atomic runs in one thread)
            tl.debug_barrier()
            tl.atomic_add(flags_ptr + t * _FLAGS_PER_TOKEN + j, 1, sem="release")


@triton.jit
def _row_shrink_kernel(
    x_ptr, a_ptr, mid_ptr, ids_ptr, ranks_ptr, K, R, k_per_split,
    stride_xm, stride_aslot, stride_arow, stride_msplit, stride_mid, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Program (split, token, slice).
    _row_shrink(tl.program_id(0), tl.program_id(1), tl.program_id(2), x_ptr, a_ptr, mid_ptr, ids_ptr, ranks_ptr,
                ids_ptr, K, R, k_per_split, stride_xm, stride_aslot, stride_arow, stride_msplit, stride_mid,
                stride_rank, BLOCK_R, BLOCK_K, False)


@triton.jit
def _row_load_tile(b_ptr, y_row, slot, offset, c, c_ok, rank, R, stride_bslot, stride_brow, BLOCK_R: tl.constexpr):
    """y[t, c] and B[slot][offset + c] of one column tile of a row expand, as loaded (see `_row_add_tile`)."""
    offs_r = tl.arange(0, BLOCK_R)
    # B loads cover the rank rounded up to 8 (16-byte vectors); `_row_add_tile` zeroes the rest.
    r_ld = offs_r < tl.minimum(tl.cdiv(rank, 8) * 8, R)
    prev = tl.load(y_row + c, mask=c_ok, other=0.0)
    bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bslot + (offset + c)[:, None] * stride_brow + offs_r[None, :],
                 mask=c_ok[:, None] & r_ld[None, :], other=0.0)
    return prev, bt


@triton.jit
def _row_add_tile(y_row, c, c_ok, prev, bt, xa, rank, BLOCK_R: tl.constexpr):
    """y[t, c] = prev + B tile · xa, B's columns past the rank zeroed with `where` (which also drops any garbage,
    NaN, there). Kept apart from the loads so that a tile's loads can be issued before xa is known."""
    bt = tl.where((tl.arange(0, BLOCK_R) < rank)[None, :], bt.to(tl.float32), 0.0)
    acc = tl.sum(bt * xa[None, :], axis=1)
    tl.store(y_row + c, (prev.to(tl.float32) + acc).to(y_row.dtype.element_ty), mask=c_ok)


@triton.jit
def _row_expand(
    pid_n, t, mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, flags_ptr, R, w0, w1, w2, cols, num_splits,
    stride_msplit, stride_mid, stride_bslot, stride_brow, stride_ym, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, WAIT: tl.constexpr,
):
    # y[t, chunk] += scaling * Σ_s mid[s, t, j*R : j*R + rank] · B[slot][chunk]ᵀ for column chunk `pid_n`.
    # The loads wait on one another as little as they can: the first column tile's B and y are issued together
    # with the split-K partials, which come in one [splits, rank] load, not one load per split. With WAIT (one
    # launch), the partials are read once all `num_splits` shrink programs of (t, j) have signalled, and the last
    # of the slice's chunk programs to read them puts the flag back to zero for the next call.
    j, first, width, offset = _slice_of(pid_n, w0, w1, w2, cols)
    slot, rank = token_adapter(ids_ptr, ranks_ptr, t, j, stride_rank)
    if rank > 0:
        y_row = y_ptr + t.to(tl.int64) * stride_ym + offset
        hi = tl.minimum(first + cols, width)
        c = first + tl.arange(0, BLOCK_N)
        prev, bt = _row_load_tile(b_ptr, y_row, slot, offset, c, c < hi, rank, R, stride_bslot, stride_brow,
                                  BLOCK_R)
        flag = flags_ptr + t * _FLAGS_PER_TOKEN + j
        if WAIT:
            signals = tl.atomic_add(flag, 0, sem="acquire")
            while signals < num_splits:
                signals = tl.atomic_add(flag, 0, sem="acquire")
            tl.debug_barrier()  # no thread's partial-sum load before the acquire
        offs_r = tl.arange(0, BLOCK_R)
        offs_s = tl.arange(0, BLOCK_S)
        parts = tl.load(mid_ptr + offs_s[:, None] * stride_msplit + t * stride_mid + j * R + offs_r[None, :],
                        mask=(offs_s < num_splits)[:, None] & (offs_r < rank)[None, :], other=0.0)
        if WAIT:
            readers = tl.atomic_add(flag, 1, sem="acq_rel") - num_splits + 1
            if readers == tl.cdiv(width, cols):
                tl.atomic_xchg(flag, 0, sem="relaxed")
        xa = tl.sum(parts, axis=0) * tl.load(scal_ptr + slot)
        _row_add_tile(y_row, c, c < hi, prev, bt, xa, rank, BLOCK_R)
        for n in range(first + BLOCK_N, hi, BLOCK_N):
            c = n + tl.arange(0, BLOCK_N)
            prev, bt = _row_load_tile(b_ptr, y_row, slot, offset, c, c < hi, rank, R, stride_bslot, stride_brow,
                                      BLOCK_R)
            _row_add_tile(y_row, c, c < hi, prev, bt, xa, rank, BLOCK_R)


@triton.jit
def _row_expand_kernel(
    mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, R, w0, w1, w2, cols, num_splits,
    stride_msplit, stride_mid, stride_bslot, stride_brow, stride_ym, stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # Program (column chunk, token).
    _row_expand(tl.program_id(0), tl.program_id(1), mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, ids_ptr,
                R, w0, w1, w2, cols, num_splits, stride_msplit, stride_mid, stride_bslot, stride_brow, stride_ym,
                stride_rank, BLOCK_R, BLOCK_N, BLOCK_S, False)


# The token count changes from step to step: not specialised, so one compiled variant serves every eager step.
@triton.jit(do_not_specialize=["num_tokens"])
def _row_one_launch_kernel(
    x_ptr, a_ptr, mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, flags_ptr, K, R, k_per_split, num_splits,
    num_tokens, num_slices, w0, w1, w2, cols, num_chunks,
    stride_xm, stride_aslot, stride_arow, stride_msplit, stride_mid, stride_bslot, stride_brow, stride_ym,
    stride_rank,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # The row shrink's programs first, then the row expand's, in one 1-D grid. An expand program waits only for
    # shrink programs, whose program ids are all lower: the GPU starts blocks in id order, so every program an
    # expand waits for is running or done, and the wait cannot deadlock.
    pid = tl.program_id(0)
    shrinks = num_splits * num_tokens * num_slices
    if pid < shrinks:
        _row_shrink(pid % num_splits, (pid // num_splits) % num_tokens, pid // (num_splits * num_tokens), x_ptr,
                    a_ptr, mid_ptr, ids_ptr, ranks_ptr, flags_ptr, K, R, k_per_split, stride_xm, stride_aslot,
                    stride_arow, stride_msplit, stride_mid, stride_rank, BLOCK_R, BLOCK_K, True)
    else:
        e = pid - shrinks
        _row_expand(e % num_chunks, e // num_chunks, mid_ptr, b_ptr, y_ptr, ids_ptr, ranks_ptr, scal_ptr, flags_ptr,
                    R, w0, w1, w2, cols, num_splits, stride_msplit, stride_mid, stride_bslot, stride_brow,
                    stride_ym, stride_rank, BLOCK_R, BLOCK_N, BLOCK_S, True)


def _row_grid(meta: LoRAMeta, block_m: int, seg_grid: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    if seg_grid:
        per_seg = triton.cdiv(meta.max_segment_len, block_m)
        return meta.seg_starts, meta.seg_starts, per_seg * meta.num_segments
    return meta.tile_maps[block_m]


def _launch(kernel, grid: tuple[int, ...], args: tuple, cfg: TileConfig, **constexprs) -> None:
    """Launch `kernel` with `cfg`'s warps and stages, or only build it (`jit.compiling`)."""
    opts = dict(constexprs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if compiling():
        kernel.warmup(*args, grid=grid, **opts)
    else:
        kernel[grid](*args, **opts)


def _block_r(rank: int) -> int:
    """The register block of a row kernel's rank: the stack's max rank, rounded up to a power of two."""
    return triton.next_power_of_2(rank)


def check_layout(x: torch.Tensor, stack_a: torch.Tensor, stack_b: torch.Tensor, out: torch.Tensor,
                 slices: tuple[int, ...]) -> None:
    if len(slices) > MAX_SLICES:
        raise ValueError(f"Triton LoRA kernels fuse at most {MAX_SLICES} slices, got {len(slices)}")
    for name, t in (("x", x), ("stack_a", stack_a), ("stack_b", stack_b), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _k_per_split(K: int, cfg: TileConfig) -> int:
    return triton.cdiv(triton.cdiv(K, cfg.split_k), cfg.block_k) * cfg.block_k


def num_splits(K: int, cfg: TileConfig) -> int:
    """Partial sums the shrink writes for reduction length K (split_k, less where chunks would be empty)."""
    return triton.cdiv(K, _k_per_split(K, cfg))


def intermediate(meta: LoRAMeta, K: int, rows: int, cfg: TileConfig, device: torch.device) -> torch.Tensor:
    """The fp32 [splits, tokens, rows] buffer between shrink and expand, from the step's shared scratch: a row per
    position in `token_order`, or per token for the row kernels."""
    shape = (num_splits(K, cfg), meta.num_tokens if cfg.block_m == 1 else meta.num_lora_tokens, rows)
    if compiling():  # a throwaway buffer: a graph's metadata keeps its scratch, sized by what its capture runs
        return torch.empty(shape, dtype=torch.float32, device=device)
    return meta.scratch(shape[0] * shape[1] * shape[2], torch.float32, device).view(shape)


def shrink(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, ranks: torch.Tensor, mid: torch.Tensor,
           cfg: TileConfig, *, seg_grid: bool = False) -> None:
    """mid[s, p, j*R + r] = x[token_order[p]] · A[slot][j*R + r] over split s of K, for every valid rank row
    (others left unwritten); with the row kernel, p is the token itself."""
    K = x.shape[1]
    rows = stack_a.shape[1]
    R = rows // ranks.shape[0]
    common = (K, R, _k_per_split(K, cfg), x.stride(0), stack_a.stride(0), stack_a.stride(1), mid.stride(0),
              mid.stride(1), ranks.stride(0))
    if cfg.block_m == 1:
        _launch(_row_shrink_kernel, (mid.shape[0], meta.num_tokens, ranks.shape[0]),
                (x, stack_a, mid, meta.ids, ranks, *common), cfg, BLOCK_R=_block_r(R), BLOCK_K=cfg.block_k)
        return
    tile_seg, tile_row, grid_m = _row_grid(meta, cfg.block_m, seg_grid)
    _launch(_shrink_kernel, (triton.cdiv(rows, cfg.block_n), grid_m, mid.shape[0]),
            (x, stack_a, mid, ranks, meta.token_order, meta.seg_slots, meta.seg_starts, tile_seg, tile_row,
             meta.num_segments, *common[:2], rows, *common[2:]),
            cfg, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SEG_GRID=seg_grid)


def expand(mid: torch.Tensor, meta: LoRAMeta, stack_b: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor,
           slices: tuple[int, ...], out: torch.Tensor, cfg: TileConfig, *, seg_grid: bool = False) -> None:
    """out[token_order[p], slice j] += scaling[slot] * Σ_s mid[s, p, j*R : j*R + rank_j] @ B[slot][slice j, :rank_j]ᵀ
    (slice j's rows of B; with the row kernel, p is the token itself)."""
    R = stack_b.shape[2]
    w = slice_widths(slices)
    strides = (mid.stride(0), mid.stride(1), stack_b.stride(0), stack_b.stride(1), out.stride(0), ranks.stride(0))
    if cfg.block_m == 1:
        cols = chunk_columns(slices, cfg)
        _launch(_row_expand_kernel, (column_programs(slices, cols), meta.num_tokens),
                (mid, stack_b, out, meta.ids, ranks, scalings, R, *w, cols, mid.shape[0], *strides),
                cfg, BLOCK_R=_block_r(R), BLOCK_N=cfg.block_n, BLOCK_S=triton.next_power_of_2(mid.shape[0]))
        return
    tile_seg, tile_row, grid_m = _row_grid(meta, cfg.block_m, seg_grid)
    _launch(_expand_kernel, (column_programs(slices, cfg.block_n), grid_m),
            (mid, stack_b, out, ranks, scalings, meta.token_order, meta.seg_slots, meta.seg_starts, tile_seg,
             tile_row, meta.num_segments, R, *w, mid.shape[0], *strides),
            cfg, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SEG_GRID=seg_grid)


def slice_widths(slices: tuple[int, ...]) -> tuple[int, ...]:
    """The output slices' widths as the kernels take them (`_slice_of`): MAX_SLICES of them, zeros past the last."""
    return tuple(slices) + (0,) * (MAX_SLICES - len(slices))


def column_programs(slices: tuple[int, ...], cols: int) -> int:
    """Programs per row (or row tile) that cover every slice's output in chunks of `cols` columns (`_slice_of`)."""
    return sum(triton.cdiv(width, cols) for width in slices)


def chunk_columns(slices: tuple[int, ...], cfg: TileConfig) -> int:
    """Columns of one fused or row-expand program: the output cut into about `split_n` chunks, whole BLOCK_N
    tiles each."""
    return triton.cdiv(triton.cdiv(sum(slices), cfg.split_n), cfg.block_n) * cfg.block_n


def fused(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
          scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor, cfg: TileConfig) -> None:
    """out[token_order[p], slice j] += scaling[slot] * (x[token_order[p]] · A[slot][slice j, :rank_j]ᵀ) ·
    B[slot][slice j, :rank_j]ᵀ in one launch."""
    tile_seg, tile_row, grid_m = meta.tile_maps[cfg.block_m]
    R = stack_b.shape[2]
    cols = chunk_columns(slices, cfg)
    w = slice_widths(slices)
    _launch(_fused_kernel, (column_programs(slices, cols), grid_m), (
        x, stack_a, stack_b, out, ranks, scalings, meta.token_order, meta.seg_slots, meta.seg_starts, tile_seg,
        tile_row, meta.num_segments, x.shape[1], R, *w, cols,
        x.stride(0), stack_a.stride(0), stack_a.stride(1), stack_b.stride(0), stack_b.stride(1), out.stride(0),
        ranks.stride(0),
    ), cfg, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=dot_block_r(R))


def one_launch(x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor, ranks: torch.Tensor,
               scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor, mid: torch.Tensor,
               plan: Plan) -> None:
    """The row shrink and expand of `plan` as one launch (`_row_one_launch_kernel`), under the expand's warps and
    stages: no gap between the two kernels, and each expand program's first B tile loads while the shrink runs."""
    shrink_cfg, expand_cfg = plan.shrink, plan.expand
    K, R, T = x.shape[1], stack_b.shape[2], meta.num_tokens
    cols = chunk_columns(slices, expand_cfg)
    chunks = column_programs(slices, cols)
    w = slice_widths(slices)
    flags = meta.flags(T * MAX_SLICES, x.device)
    _launch(_row_one_launch_kernel, (mid.shape[0] * T * ranks.shape[0] + chunks * T,), (
        x, stack_a, mid, stack_b, out, meta.ids, ranks, scalings, flags, K, R, _k_per_split(K, shrink_cfg),
        mid.shape[0], T, ranks.shape[0], *w, cols, chunks,
        x.stride(0), stack_a.stride(0), stack_a.stride(1), mid.stride(0), mid.stride(1), stack_b.stride(0),
        stack_b.stride(1), out.stride(0), ranks.stride(0),
    ), expand_cfg, BLOCK_R=_block_r(R), BLOCK_K=shrink_cfg.block_k, BLOCK_N=expand_cfg.block_n,
        BLOCK_S=triton.next_power_of_2(mid.shape[0]))


def run(plan: Plan, x: torch.Tensor, meta: LoRAMeta, stack_a: torch.Tensor, stack_b: torch.Tensor,
        ranks: torch.Tensor, scalings: torch.Tensor, slices: tuple[int, ...], out: torch.Tensor) -> None:
    """One LoRA call by `plan`: the fused kernel, or the shrink into the step's scratch then the expand (in one
    launch for a one-launch row plan)."""
    if plan.fused is not None:
        fused(x, meta, stack_a, stack_b, ranks, scalings, slices, out, plan.fused)
        return
    mid = intermediate(meta, x.shape[1], stack_a.shape[1], plan.shrink, x.device)
    if plan.one_launch:
        one_launch(x, meta, stack_a, stack_b, ranks, scalings, slices, out, mid, plan)
        return
    shrink(x, meta, stack_a, ranks, mid, plan.shrink)
    expand(mid, meta, stack_b, ranks, scalings, slices, out, plan.expand)
