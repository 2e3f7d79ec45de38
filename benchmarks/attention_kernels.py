"""Paged attention kernels on Qwen2-VL-7B shapes (H=28, KVH=4, D=128, block 16, bf16): Triton vs PyTorch vs roofline.

    python -m benchmarks.attention_kernels                      # on the GPU: prints the tables, writes the JSON
    python -m benchmarks.attention_kernels --decode-block-n 64 128 --splits 0 8 32   # tuning sweeps
    TRITON_INTERPRET=1 python -m benchmarks.attention_kernels --smoke               # CPU: exercises the script

Decode (one query per sequence, B sequences of `ctx` keys each, blocks scattered over the cache):
  triton      `paged_decode_attention` alone (split-KV + reduction; splits 0 = the heuristic)
  layer       `PagedAttention.forward` with the Triton backend (K/V write + kernels), what a model layer pays
  torch       `PagedAttention.forward` with the PyTorch backend (slot gather + padded SDPA)
  sdpa        SDPA on keys already gathered into dense [B, KVH, ctx, D] tensors (no paging cost at all)
  floor       K+V bytes of the batch / measured device copy bandwidth (read + write of a 1 GiB buffer)
Prefill (S sequences, q_len new queries each after `prefix` cached keys): `paged_prefill_attention` vs SDPA on
dense tensors (flash backend when there is no prefix), in causal TFLOP/s.

Times are device times with L2 flushed before each call (valora.lora.tuning.timing), launch gaps hidden. Block
tables are `--max-model-len / block` wide, as the engine's CUDA graphs make them.
"""

from __future__ import annotations

import argparse
import functools
import random

import torch
import torch.nn.functional as F

from benchmarks.common import device_rates, device_time_us, write_result
from valora.models.layers import attention_kernels as ak
from valora.models.layers.attention import AttentionMeta, PagedAttention

DECODE_BATCHES = (1, 8, 32, 128)
DECODE_CONTEXTS = (512, 2048, 8192)
DEFAULT_BLOCK_N = ak.DECODE_BLOCK_N
PREFILL_CASES = ((1, 512, 0), (1, 2048, 0), (1, 8192, 0), (4, 1024, 0), (16, 256, 0), (1, 512, 2048), (4, 256, 4096))


def paged_setup(lens: list[int], h: int, kvh: int, d: int, bs: int, width: int, dtype, device, seed: int):
    """A cache holding exactly the sequences' blocks, in shuffled order; tables [S, width] and the slots."""
    rng = random.Random(seed)
    need = [-(-n // bs) for n in lens]
    blocks = list(range(sum(need)))
    rng.shuffle(blocks)
    tables = torch.zeros(len(lens), max(width, max(need)), dtype=torch.int32)
    slots, o = [], 0
    for i, (n, nb) in enumerate(zip(lens, need)):
        tables[i, :nb] = torch.tensor(blocks[o : o + nb])
        o += nb
        idx = torch.arange(n)
        slots.append(tables[i, idx // bs].long() * bs + idx % bs)
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (max(sum(need), 1) * bs, kvh, d)
    k_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    v_cache = torch.randn(shape, generator=g).to(dtype).to(device)
    return k_cache, v_cache, tables.to(device), [s.to(device) for s in slots]


def bench_decode(args, device, dtype, bw_gbps: float) -> list[dict]:
    rows = []
    for b in args.batches:
        for ctx in args.contexts:
            rows += decode_case(args, b, ctx, device, dtype, bw_gbps)
    return rows


def decode_case(args, b: int, ctx: int, device, dtype, bw_gbps: float) -> list[dict]:
    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    width = -(-args.max_model_len // bs)
    scale = d**-0.5
    kc, vc, tables, slots = paged_setup([ctx] * b, h, kvh, d, bs, width, dtype, device, seed=b * 7 + ctx)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    q = torch.randn(b, h, d, device=device).to(dtype)
    out = torch.empty_like(q)
    kv_bytes = 2 * b * ctx * kvh * d * kc.element_size()
    # Dense baseline: the same keys, gathered once outside the timing.
    flat = torch.stack(slots).reshape(-1)
    kd = kc.index_select(0, flat).view(b, ctx, kvh, d).transpose(1, 2).contiguous()
    vd = vc.index_select(0, flat).view(b, ctx, kvh, d).transpose(1, 2).contiguous()
    qd = q.unsqueeze(2)
    sdpa = functools.partial(F.scaled_dot_product_attention, qd, kd, vd, scale=scale, enable_gqa=True)
    ref = sdpa().squeeze(2)
    sdpa_us = device_time_us(sdpa, device)
    del kd, vd, sdpa  # free the dense copies before the paged runs
    # One decode step of a layer: the new token's K/V written at slot ctx-1 of each sequence.
    meta = AttentionMeta(torch.stack([s[-1] for s in slots]), bs, decode_rows=torch.arange(b, device=device),
                         decode_context_lens=lens, decode_block_tables=tables, decode_max_context=ctx)
    k_new = kc.index_select(0, meta.slot_mapping)
    v_new = vc.index_select(0, meta.slot_mapping)
    layer_us = {}
    for name in ("triton", "torch"):
        m = PagedAttention(h, kvh, d, backend=name)
        layer_us[name] = device_time_us(functools.partial(m, q, k_new, v_new, (kc, vc), meta), device)
    rows = []
    for block_n in args.decode_block_n:
        ak.DECODE_BLOCK_N = block_n
        for splits_arg in args.splits:
            splits = splits_arg or ak.decode_num_splits(b, kvh, tables.shape[1], bs, device)
            fn = functools.partial(ak.paged_decode_attention, q, kc, vc, tables, lens, bs, scale, out,
                                   num_splits=splits)
            fn()
            err = (out.float() - ref.float()).abs().max().item()
            us = device_time_us(fn, device)
            floor = kv_bytes / bw_gbps / 1e3
            rows.append(dict(batch=b, context=ctx, block_n=block_n, splits=splits, triton_us=us,
                             layer_triton_us=layer_us["triton"], layer_torch_us=layer_us["torch"],
                             sdpa_dense_us=sdpa_us, floor_us=floor, kv_mb=kv_bytes / 1e6,
                             gbps=kv_bytes / us / 1e3, pct_floor=100 * floor / us, max_abs_err=err))
            print_row(rows[-1], DECODE_COLS)
    ak.DECODE_BLOCK_N = DEFAULT_BLOCK_N
    return rows


def bench_prefill(args, device, dtype) -> list[dict]:
    rows = []
    for s, q_len, prefix in args.prefill:
        rows.append(prefill_case(args, s, q_len, prefix, device, dtype))
        print_row(rows[-1], PREFILL_COLS)
    return rows


def prefill_case(args, s: int, q_len: int, prefix: int, device, dtype) -> dict:
    h, kvh, d, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    scale = d**-0.5
    ctx = q_len + prefix
    kc, vc, tables, slots = paged_setup([ctx] * s, h, kvh, d, bs, 0, dtype, device, seed=s + q_len + prefix)
    q = torch.randn(s * q_len, h, d, device=device).to(dtype)
    out = torch.empty_like(q)
    i32 = functools.partial(torch.tensor, dtype=torch.int32, device=device)
    starts, qlens, ctxs = i32([i * q_len for i in range(s)]), i32([q_len] * s), i32([ctx] * s)
    flat = torch.stack(slots).reshape(-1)
    kd = kc.index_select(0, flat).view(s, ctx, kvh, d).transpose(1, 2).contiguous()
    vd = vc.index_select(0, flat).view(s, ctx, kvh, d).transpose(1, 2).contiguous()
    qd = q.view(s, q_len, h, d).transpose(1, 2).contiguous()
    if prefix == 0:
        sdpa = functools.partial(F.scaled_dot_product_attention, qd, kd, vd, is_causal=True, scale=scale,
                                 enable_gqa=True)
    else:
        mask = torch.arange(ctx, device=device)[None, :] <= torch.arange(prefix, ctx, device=device)[:, None]
        sdpa = functools.partial(F.scaled_dot_product_attention, qd, kd, vd, attn_mask=mask, scale=scale,
                                 enable_gqa=True)
    ref = sdpa().transpose(1, 2).reshape(s * q_len, h, d)
    sdpa_us = device_time_us(sdpa, device)
    fn = functools.partial(ak.paged_prefill_attention, q, kc, vc, tables, starts, qlens, ctxs, bs, scale, out,
                           q_len)
    fn()
    err = (out.float() - ref.float()).abs().max().item()
    us = device_time_us(fn, device)
    flops = 4 * s * h * d * (q_len * prefix + q_len * (q_len + 1) / 2)  # QK^T and PV over the visible keys
    return dict(seqs=s, q_len=q_len, prefix=prefix, triton_us=us, sdpa_dense_us=sdpa_us,
                triton_tflops=flops / us / 1e6, sdpa_tflops=flops / sdpa_us / 1e6, max_abs_err=err)


DECODE_COLS = ("batch", "context", "block_n", "splits", "kv_mb", "triton_us", "floor_us", "pct_floor", "gbps",
               "layer_triton_us", "layer_torch_us", "sdpa_dense_us", "max_abs_err")
PREFILL_COLS = ("seqs", "q_len", "prefix", "triton_us", "triton_tflops", "sdpa_dense_us", "sdpa_tflops", "max_abs_err")


def print_header(cols) -> None:
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))


def print_row(row: dict, cols) -> None:
    cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
    print("| " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=32768, help="sets the block-table width")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES))
    p.add_argument("--contexts", type=int, nargs="+", default=list(DECODE_CONTEXTS))
    p.add_argument("--decode-block-n", type=int, nargs="+", default=[ak.DECODE_BLOCK_N])
    p.add_argument("--splits", type=int, nargs="+", default=[0], help="0: the heuristic; else powers of two")
    p.add_argument("--prefill", type=lambda x: tuple(int(v) for v in x.split(",")), nargs="*",
                   default=list(PREFILL_CASES), help="seqs,q_len,prefix triples")
    p.add_argument("--no-decode", action="store_true")
    p.add_argument("--name", default="attention_kernels", help="result file name (under $OUT or benchmarks/results)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, for a CPU run of the script itself")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.smoke:
        args.heads, args.kv_heads, args.head_dim, args.block_size, args.max_model_len = 4, 2, 16, 4, 64
        args.batches, args.contexts, args.prefill = [2], [13], [(2, 9, 0), (1, 5, 6)]
        args.dtype, dtype = "float32", torch.float32
    torch.manual_seed(0)
    bw = device_rates(device)["copy_bytes_per_s"] / 1e9
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, copy bandwidth {bw:.0f} GB/s,"
          f" H={args.heads} KVH={args.kv_heads} D={args.head_dim} block={args.block_size} {args.dtype}")
    decode = []
    if not args.no_decode:
        print("\n## decode\n")
        print_header(DECODE_COLS)
        decode = bench_decode(args, device, dtype, bw)
    print("\n## prefill\n")
    print_header(PREFILL_COLS)
    prefill = bench_prefill(args, device, dtype)
    config = {k: v for k, v in vars(args).items() if k not in ("prefill",)}
    path = write_result(args.name, {"config": config, "copy_gbps": bw, "decode": decode, "prefill": prefill})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
