"""Does running the LoRA shrink beside the base GEMM pay at decode? (issue 18: LoRA at its bytes)

    python -m benchmarks.lora_overlap                # 32 and 64 tokens; needs a CUDA GPU

Eight decoder layers' four linears (fused qkv, o, fused gate/up, down) at Qwen2-VL-7B shapes, every token its own
rank-16 adapter (32 adapters), each variant captured in one CUDA graph and replayed; time per layer:

- `base`: the base GEMMs alone;
- `tuned`: each GEMM then `lora_matmul` by the tuned table's plan (fused or shrink + expand), as the engine runs;
- `split`: each GEMM then the shrink and the expand, every linear on the split path (fixed decode tiles);
- `overlap`: the same shrink on a second stream, forked before the GEMM (both read only x), the expand after both.

The shrink's x·A does not depend on the GEMM, so on paper it hides behind it; the answer is in the numbers (on
the H100 it did not: docs/benchmarks.md). Results: benchmarks/results/lora_overlap_<gpu>.json.
"""

from __future__ import annotations

import argparse
import functools

import torch

from benchmarks.common import graph_time_us, write_result
from valora.lora.ops import kernels, lora_matmul
from valora.lora.ops.configs import TileConfig
from valora.lora.ops.meta import LoRAMeta

LINEARS = {"qkv": (3584, (3584, 512, 512)), "o": (3584, (3584,)), "gate_up": (3584, (18944, 18944)),
           "down": (18944, (3584,))}
SHRINK = TileConfig(16, 16, 128, 4, 3, split_k=8)  # the tuned H100 table's decode shrink (o_proj)
SHRINK_WIDE_K = TileConfig(16, 16, 256, 4, 4, split_k=8)  # and down_proj's
EXPAND = TileConfig(16, 128, 16, 4, 4)
RANK, ADAPTERS = 16, 32


class Layers:
    """Weights, adapters and static activations of `layers` decoder layers' linears."""

    def __init__(self, tokens: int, layers: int, device: torch.device) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        opts = dict(device=device, dtype=torch.bfloat16)
        self.meta = LoRAMeta.build([i % ADAPTERS for i in range(tokens)], device)
        self.scalings = torch.ones(ADAPTERS, device=device)
        self.side = torch.cuda.Stream(device)
        self.linears = []
        for _ in range(layers):
            for k, slices in LINEARS.values():
                cfg = SHRINK_WIDE_K if k > 4096 else SHRINK
                self.linears.append(dict(
                    w=torch.randn(sum(slices), k, generator=g, **opts) * k**-0.5,
                    a=torch.randn(ADAPTERS, len(slices) * RANK, k, generator=g, **opts) * k**-0.5,
                    b=torch.randn(ADAPTERS, sum(slices), RANK, generator=g, **opts) * RANK**-0.5,
                    ranks=torch.full((len(slices), ADAPTERS), RANK, dtype=torch.int32, device=device),
                    x=torch.randn(tokens, k, generator=g, **opts), y=torch.empty(tokens, sum(slices), **opts),
                    mid=torch.empty(kernels.num_splits(k, cfg), tokens, len(slices) * RANK, device=device),
                    slices=slices, cfg=cfg))

    def base(self, p: dict) -> None:
        torch.matmul(p["x"], p["w"].t(), out=p["y"])

    def tuned(self, p: dict) -> None:
        self.base(p)
        lora_matmul(p["x"], None, p["a"], p["b"], p["ranks"], self.scalings, "atmm", slices=p["slices"],
                    out=p["y"], meta=self.meta)

    def _shrink(self, p: dict) -> None:
        kernels.shrink(p["x"], self.meta, p["a"], p["ranks"], p["mid"], p["cfg"])

    def _expand(self, p: dict) -> None:
        kernels.expand(p["mid"], self.meta, p["b"], p["ranks"], self.scalings, p["slices"], p["y"], EXPAND)

    def split(self, p: dict) -> None:
        self.base(p)
        self._shrink(p)
        self._expand(p)

    def overlap(self, p: dict) -> None:
        main = torch.cuda.current_stream()
        self.side.wait_stream(main)
        with torch.cuda.stream(self.side):
            self._shrink(p)
        self.base(p)
        main.wait_stream(self.side)
        self._expand(p)

    def step(self, variant: str) -> None:
        fn = getattr(self, variant)
        for p in self.linears:
            fn(p)

    def outputs(self) -> torch.Tensor:
        return torch.cat([p["y"].float().flatten() for p in self.linears])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers per graph (their weights exceed L2)")
    ap.add_argument("--reps", type=int, default=50, help="timed replays of each variant's graph (the median is kept)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("lora_overlap needs a CUDA GPU")
    device = torch.device("cuda")
    rows = []
    for tokens in args.tokens:
        layers = Layers(tokens, args.layers, device)
        us = {v: graph_time_us(functools.partial(layers.step, v), reps=1, trials=args.reps) / args.layers
              for v in ("base", "tuned", "split", "overlap")}
        outputs = {}
        for v in ("split", "overlap"):
            layers.step(v)
            outputs[v] = layers.outputs()
        rows.append({"tokens": tokens, "layer_us": us,
                     "lora_over_base": {v: us[v] / us["base"] - 1 for v in ("tuned", "split", "overlap")},
                     "overlap_equals_split": bool(torch.equal(outputs["split"], outputs["overlap"]))})
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name().replace(" ", "_").lower()
    print(f"written {write_result(f'lora_overlap_{name}', {'adapters': ADAPTERS, 'rank': RANK, 'rows': rows})}")


if __name__ == "__main__":
    main()
