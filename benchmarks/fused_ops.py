"""The decoder's small per-layer ops on Qwen2-VL-7B shapes: the PyTorch path against the fused Triton kernels of
valora/models/layers/fused_kernels.py, op by op and for the whole per-step "glue" (28 layers of them).

    python -m benchmarks.fused_ops                 # on the GPU: prints a table, writes $OUT/fused_ops.json
    python -m benchmarks.fused_ops --tokens 1 32   # a subset of token counts

Ops, each at T tokens (bf16): `rms_norm` (hidden 3584), `add_rms_norm` (the residual add fused into the norm),
`silu_and_mul` (gate/up 2 x 18944), `rotary` (q 28 heads and k 4 heads of 128 from a fused qkv row, M-RoPE
sections [16, 24, 24]; the PyTorch side rotates with the step's cos/sin tables, the fused kernel computes them
inline), `rope_tables` (the PyTorch path's once-per-step cos/sin, which the fused path skips), and `step_glue`:
everything of one decode step that is not a GEMM or attention (cos/sin, 28 x (two norms with residual adds,
rotary, silu*mul), the final norm), run through the real module code with fused_kernels.ENABLED off and on.

Two times per case, both medians over CUDA-event measurements after a warm-up:
  graph_us   one call inside a CUDA graph of `reps` back-to-back calls, L2 warm: what a CUDA-graph decode step
             pays, launch gaps between the tiny PyTorch kernels included;
  device_us  valora.lora.tuning.timing.gpu_time_us: L2 flushed before each call, launches queued ahead so no
             host gaps (device time only), as the LoRA operator benchmark measures.
`max_abs_diff` compares each fused output to the PyTorch one (bf16: within a rounding of the type).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.common import QWEN2_VL_7B, graph_time_us, write_result

HIDDEN = QWEN2_VL_7B["hidden_size"]
INTER = QWEN2_VL_7B["intermediate_size"]
LAYERS = QWEN2_VL_7B["num_hidden_layers"]
HEADS, KV_HEADS, HEAD_DIM = QWEN2_VL_7B["num_attention_heads"], QWEN2_VL_7B["num_key_value_heads"], 128
SECTIONS = (16, 24, 24)
THETA = 1e6
EPS = 1e-6
TOKENS = (1, 32, 128, 8192)


def max_diff(a, b) -> float:
    if isinstance(a, (tuple, list)):
        return max(max_diff(x, y) for x, y in zip(a, b))
    return (a.float() - b.float()).abs().max().item()


def cases(t: int, device: torch.device, dtype: torch.dtype):
    """{op: (torch fn, fused fn)} at t tokens; each fn returns its outputs."""
    from valora.models.layers import fused_kernels
    from valora.models.layers.norm import RMSNorm
    from valora.models.layers.rotary import MRotaryEmbedding

    g = torch.Generator(device=device).manual_seed(t)
    opts = dict(device=device, dtype=dtype)
    norm = RMSNorm(HIDDEN, EPS).to(**opts)
    norm.weight.data.normal_(1.0, 0.2, generator=g)
    x = torch.randn(t, HIDDEN, generator=g, **opts)
    residual = torch.randn(t, HIDDEN, generator=g, **opts)
    gate_up = torch.randn(t, 2 * INTER, generator=g, **opts)
    qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g, **opts)
    q = qkv[:, : HEADS * HEAD_DIM].view(t, HEADS, HEAD_DIM)
    k = qkv[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(t, KV_HEADS, HEAD_DIM)
    rotary = MRotaryEmbedding(HEAD_DIM, THETA, SECTIONS).to(device)
    positions = torch.randint(0, 16384, (3, t), generator=g, device=device)
    rope_torch = rotary.for_step(positions, dtype, fused=False)
    rope_fused = rotary.for_step(positions, dtype, fused=True)

    def torch_add_norm():
        s = x + residual
        return norm._norm(s), s

    def glue(fused: bool):
        """The non-GEMM, non-attention work of one step through the real module code (norm.py, rotary.py, the
        GatedMLP activation), with the fused kernels switched on or off."""
        def run():
            enabled = fused_kernels.ENABLED
            fused_kernels.ENABLED = fused
            try:
                rope = rotary.for_step(positions, dtype, fused=fused_kernels.use_triton(x))
                h, res = norm(x), x
                for _ in range(LAYERS):
                    h, res = norm(h, res)  # input norm (the MLP output stands in for h)
                    rope(q, k)
                    h, res = norm(h, res)  # post-attention norm (h stands in for o_proj's output)
                    if fused_kernels.use_triton(gate_up):
                        fused_kernels.silu_and_mul(gate_up)
                    else:
                        gate, up = gate_up.split(INTER, dim=-1)
                        F.silu(gate) * up
                return norm(h, res)[0]
            finally:
                fused_kernels.ENABLED = enabled
        return run

    return {
        "rms_norm": (lambda: norm._norm(x), lambda: fused_kernels.rms_norm(x, norm.weight, EPS)),
        "add_rms_norm": (torch_add_norm, lambda: fused_kernels.rms_norm(x, norm.weight, EPS, residual)),
        "silu_and_mul": (lambda: F.silu(gate_up[:, :INTER]) * gate_up[:, INTER:],
                         lambda: fused_kernels.silu_and_mul(gate_up)),
        "rotary": (lambda: rope_torch(q, k), lambda: rope_fused(q, k)),
        "rope_tables": (lambda: rotary(positions, dtype), None),
        "step_glue": (glue(False), glue(True)),
    }


def bytes_moved(op: str, t: int, elem: int) -> int | None:
    """Fewest bytes the fused kernel must move (read + write)."""
    qk = (HEADS + KV_HEADS) * HEAD_DIM
    return {
        "rms_norm": elem * (2 * t * HIDDEN + HIDDEN),
        "add_rms_norm": elem * (4 * t * HIDDEN + HIDDEN),
        "silu_and_mul": elem * 3 * t * INTER,
        "rotary": elem * 2 * t * qk + 8 * 3 * t,
    }.get(op)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--name", default="fused_ops", help="result file name (without .json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("fused_ops.py times CUDA kernels: run it on the GPU")
    from valora.lora.tuning.timing import gpu_time_us

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    for t in args.tokens:
        for op, (torch_fn, fused_fn) in cases(t, device, dtype).items():
            # calls per graph: many for the tiny decode cases, few where one call is milliseconds
            graph_reps = 20 if t <= 128 else (1 if op == "step_glue" else 3)
            row = {"op": op, "tokens": t}
            row["torch_graph_us"] = graph_time_us(torch_fn, graph_reps)
            row["torch_device_us"] = gpu_time_us(torch_fn, device=device)
            if fused_fn is not None:
                row["fused_graph_us"] = graph_time_us(fused_fn, graph_reps)
                row["fused_device_us"] = gpu_time_us(fused_fn, device=device)
                row["speedup_graph"] = row["torch_graph_us"] / row["fused_graph_us"]
                row["max_abs_diff"] = max_diff(fused_fn(), torch_fn())
                moved = bytes_moved(op, t, elem)
                if moved:
                    row["fused_gbps"] = moved / row["fused_device_us"] / 1e3
            rows.append(row)
            torch.cuda.empty_cache()
            print(_fmt(row), flush=True)

    print("\n" + _table(rows))
    path = write_result(args.name, {
        "dtype": args.dtype,
        "shapes": {"hidden": HIDDEN, "intermediate": INTER, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS,
                   "head_dim": HEAD_DIM, "mrope_section": list(SECTIONS)},
        "rows": rows,
    })
    print(f"wrote {path}")


def _fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def _table(rows: list[dict]) -> str:
    head = ("op", "T", "torch graph us", "fused graph us", "x", "torch dev us", "fused dev us", "fused GB/s",
            "max |diff|")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def f(key, fmt="{:.1f}", r=r):
            return fmt.format(r[key]) if key in r else "-"
        lines.append("| " + " | ".join([
            r["op"], str(r["tokens"]), f("torch_graph_us"), f("fused_graph_us"), f("speedup_graph", "{:.1f}x"),
            f("torch_device_us"), f("fused_device_us"), f("fused_gbps", "{:.0f}"), f("max_abs_diff", "{:.2g}"),
        ]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
