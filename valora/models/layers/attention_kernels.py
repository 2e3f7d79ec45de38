"""Triton attention: over the paged KV cache for the language model (every program reads only the blocks its
sequence owns), and over packed dense rows for the vision towers.

The cache of one layer is a pair of [num_slots, KVH, D] tensors; key i of a sequence sits in slot
`block_table[i // block_size] * block_size + i % block_size`. Both kernels gather their key/value tiles through
the block table (BLOCK_N keys = several blocks per iteration, each key a contiguous D-vector), keep the softmax
online in fp32 (base 2, the scale folded into one multiply), and accumulate P·V in fp32.

- `paged_decode_attention`: one query per sequence. A program owns one (sequence, KV head, KV split) and all
  H/KVH query heads of that group as one [BLOCK_G, D] tile (BLOCK_G >= 16 so that Q·Kᵀ is one tl.dot): every
  key tile is read once per group, not once per head. Long contexts are split across programs (flash-decoding):
  the number of splits depends only on tensor shapes (and the SM count); each program derives its key range from
  its sequence's context length, so short sequences leave the trailing splits empty (those programs exit at once
  and the reduction skips them). A small second kernel merges the splits' (max, sum, acc) partials.
- `paged_prefill_attention`: variable-length causal attention, FlashAttention-2 tiling (BLOCK_M queries x
  BLOCK_N keys). A sequence's q_len queries are the last q_len positions of its context_len keys (cached prefix +
  the new keys just written), so prefill, chunked prefill and recompute are one case. Key tiles below the
  diagonal run without masks; only the tiles that cross it are masked.
- `varlen_attention`: the vision towers' bidirectional attention within spans of packed rows (images, frames,
  Qwen2.5-VL's windows), no cache. The host cuts every span into query tiles once per pass (a table of (query
  rows, key rows) per tile), so the grid is (heads, tiles): no program is spent on a short span's padding, and a
  table padded to a fixed length serves a CUDA graph for any mix of span lengths. Head sizes that are not a
  power of two (Qwen2-VL's ViT: 80) run as two column blocks (64 + 16), so no dot works on padding.

All are CUDA-graph safe: no host sync, grids from tensor shapes (and, for prefill, the host int max_q_len), and
the only allocation is the split-KV workspace sized from shapes (or passed in).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634

# Decode tiling: keys per iteration, and how the split count is chosen (see `decode_num_splits`).
DECODE_BLOCK_N = 64
DECODE_MAX_SPLITS = 64
DECODE_MIN_KEYS_PER_SPLIT = 128
DECODE_PROGRAMS_PER_SM = 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 132  # interpreter / tests: behave like an H100


def decode_num_splits(batch: int, num_kv_heads: int, max_blocks: int, block_size: int, device: torch.device) -> int:
    """KV splits per (sequence, KV head): enough programs for about DECODE_PROGRAMS_PER_SM per SM, at most one split
    per DECODE_MIN_KEYS_PER_SPLIT keys of the table's capacity, a power of two <= DECODE_MAX_SPLITS. Shapes only."""
    want = triton.cdiv(DECODE_PROGRAMS_PER_SM * _num_sms(device), max(batch * num_kv_heads, 1))
    by_len = triton.cdiv(max_blocks * block_size, DECODE_MIN_KEYS_PER_SPLIT)
    n = max(1, min(want, by_len, DECODE_MAX_SPLITS))
    return 1 << (n.bit_length() - 1)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact fp32 dots (tf32 would cost accuracy)


@triton.jit
def _tile_mask(row_mask, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[R, BLOCK_D] mask: valid rows x valid columns. Columns are masked only when D is not a power of two, so that a
    full-width row keeps a mask that is constant along D and its access stays vectorised."""
    if BLOCK_D == HEAD_DIM:
        mask = row_mask[:, None] & tl.full([1, BLOCK_D], 1, tl.int1)
    else:
        mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    return mask


@triton.jit
def _split_range(ctx, split, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys [start, end) of split `split` of a context of `ctx` keys (whole tiles per split, the last one short)."""
    if NUM_SPLITS == 1:
        start = ctx * 0
        end = ctx
        per = ctx
    else:
        per = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
        start = split * per
        end = tl.minimum(start + per, ctx)
    return start, end, per


@triton.jit
def _kv_bases(tables_ptr, k_ptr, v_ptr, seq, kvh, offs_d, stride_tb, stride_kh, stride_vh):
    """Sequence `seq`'s block-table row, and its KV head's key and value columns in the cache."""
    table = tables_ptr + seq.to(tl.int64) * stride_tb
    return table, k_ptr + kvh * stride_kh + offs_d[None, :], v_ptr + kvh * stride_vh + offs_d[None, :]


@triton.jit(do_not_specialize=["stride_tb"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, ws_ptr, rows_ptr, tables_ptr, lens_ptr, qk_scale,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
    stride_wb, stride_wh, stride_ws,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr, HAS_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start, end, per = _split_range(ctx, split, NUM_SPLITS, BLOCK_N)
    if NUM_SPLITS > 1 and start >= end:  # past the end of a short context: the reduction never reads this split
        return
    row = tl.load(rows_ptr + b).to(tl.int64) if HAS_ROWS else b.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kvh * G + offs_g
    gd_mask = _tile_mask(offs_g < G, offs_d, HEAD_DIM, BLOCK_D)
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gd_mask, other=0.0)
    table, k_base, v_base = _kv_bases(tables_ptr, k_ptr, v_ptr, b, kvh, offs_d, stride_tb, stride_kh, stride_vh)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE
        nd_mask = _tile_mask(n_mask, offs_d, HEAD_DIM, BLOCK_D)
        k = tl.load(k_base + slot[:, None] * stride_ks, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + slot[:, None] * stride_vs, mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # context 0: acc is 0, so is the output
        tl.store(o_ptr + row * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gd_mask)
    else:
        ws = ws_ptr + b.to(tl.int64) * stride_wb + heads * stride_wh + split * stride_ws  # [BLOCK_G]
        tl.store(ws[:, None] + offs_d[None, :], acc, mask=gd_mask)
        g_mask = offs_g < G
        tl.store(ws + HEAD_DIM, m_i, mask=g_mask)
        tl.store(ws + HEAD_DIM + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    o_ptr, ws_ptr, rows_ptr, lens_ptr, stride_ob, stride_oh, stride_wb, stride_wh, stride_ws,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    _, _, per = _split_range(ctx, 0, NUM_SPLITS, BLOCK_N)
    active = tl.cdiv(ctx, tl.maximum(per, 1))  # splits that hold keys (0 for a padding row)
    row = tl.load(rows_ptr + b).to(tl.int64) if HAS_ROWS else b.to(tl.int64)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < active
    ws = ws_ptr + b.to(tl.int64) * stride_wb + h * stride_wh + offs_s * stride_ws  # [NUM_SPLITS]
    m = tl.load(ws + HEAD_DIM, mask=s_mask, other=float("-inf"))
    lse = tl.load(ws + HEAD_DIM + 1, mask=s_mask, other=0.0)
    m_max = tl.where(active > 0, tl.max(m, 0), 0.0)
    w = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    denom = tl.sum(w * lse, 0)
    acc = tl.load(ws[:, None] + offs_d[None, :], mask=_tile_mask(s_mask, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(o_ptr + row * stride_ob + h * stride_oh + offs_d, out.to(o_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor
                  ) -> tuple[int, int, int]:
    """(query heads, head dim, KV heads), once the layouts both kernels assume are checked."""
    h, d, kvh = q.shape[1], q.shape[2], k_cache.shape[1]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("q, out and the caches need a contiguous last dimension")
    return h, d, kvh


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D], or [T, H, D] with `rows`
    k_cache: torch.Tensor,  # [num_slots, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32; 0 = padding row (output 0)
    block_size: int,
    scale: float,
    out: torch.Tensor,  # like q
    rows: torch.Tensor | None = None,  # [B] int: the rows of q/out that are the B decodes (None: rows 0..B-1)
    num_splits: int | None = None,  # None: `decode_num_splits`; a power of two otherwise
    workspace: torch.Tensor | None = None,  # [B, H, num_splits, D + 2] fp32 (split-KV partials); None: allocated
) -> torch.Tensor:
    """One-query-per-sequence attention over each sequence's first context_lens[b] keys. Writes `out`; returns it."""
    b = block_tables.shape[0]
    h, d, kvh = _check_inputs(q, k_cache, v_cache, out)
    if b == 0:
        return out
    g = h // kvh
    splits = num_splits or decode_num_splits(b, kvh, block_tables.shape[1], block_size, q.device)
    if splits & (splits - 1):
        raise ValueError(f"num_splits must be a power of two, not {splits}")
    block_d = triton.next_power_of_2(d)
    block_g = max(16, triton.next_power_of_2(g))
    rows_arg = rows if rows is not None else context_lens  # any tensor: unused without HAS_ROWS
    common = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, NUM_SPLITS=splits, HAS_ROWS=rows is not None)
    if splits > 1:
        if workspace is None:
            workspace = torch.empty((b, h, splits, d + 2), dtype=torch.float32, device=q.device)
        ws_strides = (workspace.stride(0), workspace.stride(1), workspace.stride(2))
    else:
        workspace, ws_strides = out, (0, 0, 0)  # unused
    _decode_kernel[(b, kvh, splits)](
        q, k_cache, v_cache, out, workspace, rows_arg, block_tables, context_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0), *ws_strides,
        G=g, BLOCK_G=block_g, BLOCK_SIZE=block_size, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=8 if q.dtype == torch.float32 else 4, num_stages=2, **common,
    )
    if splits > 1:
        _decode_reduce_kernel[(b, h)](
            out, workspace, rows_arg, context_lens, out.stride(0), out.stride(1), *ws_strides,
            num_warps=4 if splits * block_d >= 4096 else 2, **common,
        )
    return out


@triton.jit
def _prefill_tiles(
    acc, m_i, l_i, q, pos, k_base, v_base, table, ctx, lo, hi, stride_ks, stride_vs, offs_d, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online-softmax update of a BLOCK_M query tile with keys [lo, hi). Unmasked tiles must be whole, below the
    diagonal of every query, and inside the context."""
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            n_mask = offs_n < ctx
            blk = tl.load(table + offs_n // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
        else:
            blk = tl.load(table + offs_n // BLOCK_SIZE).to(tl.int64)
        slot = blk * BLOCK_SIZE + offs_n % BLOCK_SIZE
        k_ptrs = k_base + slot[:, None] * stride_ks
        v_ptrs = v_base + slot[:, None] * stride_vs
        if MASKED:
            nd_mask = _tile_mask(n_mask, offs_d, HEAD_DIM, BLOCK_D)
            k = tl.load(k_ptrs, mask=nd_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            k = tl.load(k_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            visible = (offs_n[None, :] <= pos[:, None]) & n_mask[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=nd_mask, other=0.0)
        elif BLOCK_D != HEAD_DIM:
            v = tl.load(v_ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_tb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, q_starts_ptr, q_lens_ptr, ctx_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_ks, stride_kh, stride_vs, stride_vh, stride_tb,
    G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heads vary fastest: the G heads of a KV group (and the groups of one query tile) run side by side and share
    # their key/value tiles through L2.
    h = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    seq = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + seq)
    if m0 >= q_len:
        return
    q_start = tl.load(q_starts_ptr + seq).to(tl.int64)
    ctx = tl.load(ctx_ptr + seq)
    prefix = ctx - q_len  # keys already cached before this step's queries
    kvh = h // G

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    md_mask = _tile_mask(offs_m < q_len, offs_d, HEAD_DIM, BLOCK_D)
    q_rows = q_start + offs_m
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :], mask=md_mask, other=0.0)
    pos = prefix + offs_m  # position of each query in its context: it sees keys 0..pos

    table, k_base, v_base = _kv_bases(tables_ptr, k_ptr, v_ptr, seq, kvh, offs_d, stride_tb, stride_kh, stride_vh)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Keys below the first query's position are visible to every query of the tile (and inside the context).
    full_end = ((prefix + m0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(ctx, prefix + m0 + BLOCK_M)
    acc, m_i, l_i = _prefill_tiles(acc, m_i, l_i, q, pos, k_base, v_base, table, ctx, 0, full_end, stride_ks,
                                   stride_vs, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, False,
                                   DOT_PRECISION)
    # The tiles that cross the diagonal; the first holds key full_end <= every query's position, so no row of the
    # tile stays at -inf (rows past q_len included: they are never stored, but must not produce NaN work).
    acc, m_i, l_i = _prefill_tiles(acc, m_i, l_i, q, pos, k_base, v_base, table, ctx, full_end, hi, stride_ks,
                                   stride_vs, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, BLOCK_SIZE, True,
                                   DOT_PRECISION)
    out = acc / l_i[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=md_mask)


def _prefill_config(dtype: torch.dtype, block_d: int, max_q_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if dtype == torch.float32 or block_d > 128:  # (fp32 dots are exact FMA loops: 8 warps keep them in registers)
        return 32, 32, 8, 1
    if max_q_len >= 512:
        return 128, 64, 8, 3
    return 64, 64, 4, 2


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_slots, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    q_starts: torch.Tensor,  # [S] int32: first row of each sequence's queries in q/out
    q_lens: torch.Tensor,  # [S] int32
    context_lens: torch.Tensor,  # [S] int32 (>= q_lens: the queries are the last q_len positions)
    block_size: int,
    scale: float,
    out: torch.Tensor,  # [T, H, D]
    max_q_len: int,  # host int: the longest q_len (sizes the grid)
    block_m: int | None = None,  # tile overrides (benchmarks); None: `_prefill_config`
    block_n: int | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its cached + new keys. Writes `out`; returns it."""
    s = block_tables.shape[0]
    h, d, kvh = _check_inputs(q, k_cache, v_cache, out)
    if s == 0 or max_q_len <= 0:
        return out
    block_d = triton.next_power_of_2(d)
    bm, bn, warps, stages = _prefill_config(q.dtype, block_d, max_q_len)
    bm, bn = block_m or bm, block_n or bn
    _prefill_kernel[(h, triton.cdiv(max_q_len, bm), s)](
        q, k_cache, v_cache, out, block_tables, q_starts, q_lens, context_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), block_tables.stride(0),
        G=h // kvh, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_SIZE=block_size,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out


# ------------------------------------------------------------------------------ vision towers: varlen, non-causal


@triton.jit
def _load_rows(base, rows, stride, offs, cols: tl.constexpr, row_mask, D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """[R, len(offs)] of rows `rows` (element stride `stride`) at columns `offs`: masked where a column is >= D, or
    (MASK_ROWS) where `row_mask` is false; unmasked when neither can happen."""
    ptrs = base + rows[:, None].to(tl.int64) * stride + offs[None, :]
    if MASK_ROWS:
        return tl.load(ptrs, mask=row_mask[:, None] & (offs < D)[None, :], other=0.0)
    if cols > D:
        return tl.load(ptrs, mask=(offs < D)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _span_tiles(acc, acc_hi, m_i, l_i, q, q_hi, k_base, v_base, lo, hi, nk, stride_kt, stride_vt, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DH: tl.constexpr, BLOCK_N: tl.constexpr,
                MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of a query tile with the span's keys [lo, hi) (dense rows); unmasked tiles are whole.
    Head dims that are not a power of two run as two column blocks, BLOCK_D + BLOCK_DH (80 = 64 + 16), so the
    dots do no work on padding columns; BLOCK_DH = 0 when HEAD_DIM is a power of two."""
    offs_d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < nk
        k = _load_rows(k_base, offs_n, stride_kt, offs_d, BLOCK_D, n_mask, HEAD_DIM, MASKED)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        if BLOCK_DH > 0:
            offs_h = BLOCK_D + tl.arange(0, BLOCK_DH)
            k_hi = _load_rows(k_base, offs_n, stride_kt, offs_h, BLOCK_D + BLOCK_DH, n_mask, HEAD_DIM, MASKED)
            s += tl.dot(q_hi, tl.trans(k_hi.to(q.dtype)), input_precision=DOT_PRECISION)
        s = s * qk_scale
        if MASKED:
            s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds at least one key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, offs_n, stride_vt, offs_d, BLOCK_D, n_mask, HEAD_DIM, MASKED)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        if BLOCK_DH > 0:
            v_hi = _load_rows(v_base, offs_n, stride_vt, offs_h, BLOCK_D + BLOCK_DH, n_mask, HEAD_DIM, MASKED)
            acc_hi = acc_hi * alpha[:, None] + tl.dot(p.to(v.dtype), v_hi, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, acc_hi, m_i, l_i


@triton.jit
def _varlen_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tiles_ptr, qk_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Heads vary fastest: the heads of one query tile run side by side and share its span's keys through L2.
    h = tl.program_id(0)
    tile = tiles_ptr + tl.program_id(1).to(tl.int64) * 4
    rows = tl.load(tile + 1)
    if rows == 0:  # an unused entry of a table padded to a fixed size (CUDA graphs)
        return
    m0 = tl.load(tile)
    k0 = tl.load(tile + 2)
    nk = tl.load(tile + 3)

    q_rows = m0 + tl.arange(0, BLOCK_M)
    m_mask = tl.arange(0, BLOCK_M) < rows
    offs_d = tl.arange(0, BLOCK_D)
    q_base = q_ptr + h * stride_qh
    o_base = o_ptr + h * stride_oh
    k_base = k_ptr + k0.to(tl.int64) * stride_kt + h * stride_kh
    v_base = v_ptr + k0.to(tl.int64) * stride_vt + h * stride_vh
    q = _load_rows(q_base, q_rows, stride_qt, offs_d, BLOCK_D, m_mask, HEAD_DIM, True)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    q_hi, acc_hi = q, acc  # placeholders when the head dim is one block
    if BLOCK_DH > 0:
        offs_h = BLOCK_D + tl.arange(0, BLOCK_DH)
        q_hi = _load_rows(q_base, q_rows, stride_qt, offs_h, BLOCK_D + BLOCK_DH, m_mask, HEAD_DIM, True)
        acc_hi = tl.zeros([BLOCK_M, BLOCK_DH], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    full_end = (nk // BLOCK_N) * BLOCK_N
    acc, acc_hi, m_i, l_i = _span_tiles(acc, acc_hi, m_i, l_i, q, q_hi, k_base, v_base, 0, full_end, nk, stride_kt,
                                        stride_vt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_DH, BLOCK_N, False,
                                        DOT_PRECISION)
    acc, acc_hi, m_i, l_i = _span_tiles(acc, acc_hi, m_i, l_i, q, q_hi, k_base, v_base, full_end, nk, nk, stride_kt,
                                        stride_vt, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_DH, BLOCK_N, True,
                                        DOT_PRECISION)
    inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)  # a span without keys (padding rows): zeros
    o_ptrs = o_base + q_rows[:, None].to(tl.int64) * stride_ot
    tl.store(o_ptrs + offs_d[None, :], (acc * inv[:, None]).to(o_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (offs_d < HEAD_DIM)[None, :])
    if BLOCK_DH > 0:
        tl.store(o_ptrs + offs_h[None, :], (acc_hi * inv[:, None]).to(o_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_h < HEAD_DIM)[None, :])


def head_blocks(head_dim: int) -> tuple[int, int]:
    """Column blocks of a head: (head_dim, 0) for a power of two, else the largest power of two below it and the
    rest rounded up to one (80 -> 64 + 16, 96 -> 64 + 32, 72 -> 64 + 16 with 8 masked columns)."""
    if head_dim & (head_dim - 1) == 0:
        return head_dim, 0
    lo = triton.next_power_of_2(head_dim) // 2
    return lo, max(16, triton.next_power_of_2(head_dim - lo))


# BLOCK_M -> (BLOCK_N, num_warps, num_stages) of `varlen_attention`
VARLEN_TILES = {32: (32, 8, 1), 64: (64, 4, 2), 128: (64, 8, 3)}


def varlen_block_m(dtype: torch.dtype, head_dim: int, max_len: int) -> int:
    """Query tile height for spans of up to `max_len` rows: tall tiles for whole images, 64 for windows, 32 for
    fp32 (exact fp32 dots are FMA loops that must stay in registers) and head sizes over 128."""
    if dtype == torch.float32 or triton.next_power_of_2(head_dim) > 128:
        return 32
    return 128 if max_len >= 512 else 64


def varlen_attention(
    q: torch.Tensor,  # [T, H, D], any row and head strides, unit stride along D
    k: torch.Tensor,
    v: torch.Tensor,
    tiles: torch.Tensor,  # [N, 4] int32: (first query row, query rows, first key row, key rows) per query tile
    scale: float,
    out: torch.Tensor,  # [T, H, D]
    block_m: int,  # the tile height `tiles` was cut with (a key of VARLEN_TILES, see `varlen_block_m`)
) -> torch.Tensor:
    """Bidirectional attention within spans of packed rows (a vision tower's images, frames or windows): every
    query tile attends to all keys of its span. Rows of tiles without keys get zeros; rows no tile covers are not
    written. Writes `out`; returns it."""
    t, h, d = q.shape
    if k.shape != q.shape or v.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} and out "
                         f"{tuple(out.shape)} must have one shape")
    if any(x.stride(-1) != 1 for x in (q, k, v, out)):
        raise ValueError("q, k, v and out need a contiguous last dimension")
    if tiles.shape[0] == 0 or t == 0:
        return out
    bn, warps, stages = VARLEN_TILES[block_m]
    block_d, block_dh = head_blocks(d)
    _varlen_kernel[(h, tiles.shape[0])](
        q, k, v, out, tiles, scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DH=block_dh,
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out
