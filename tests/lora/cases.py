"""Seeded LoRA operator problems with garbage (NaN) in every padded row and column of the stacks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from valora.lora.ops import lora_matmul

# Tolerances against the fp32 `torch` reference, elementwise: |out - ref| <= RTOL * |ref| + ATOL * max|delta|.
# fp32 runs only in the interpreter (exact fp32 dots); fp16/bf16 round the intermediate and the output.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}


@dataclass
class Case:
    x: torch.Tensor
    ids: torch.Tensor
    stack_a: torch.Tensor
    stack_b: torch.Tensor
    ranks: torch.Tensor  # [S, N]
    scalings: torch.Tensor
    slices: tuple[int, ...]
    base: torch.Tensor  # what `out` holds before the call

    def run(self, backend: str) -> torch.Tensor:
        out = self.base.clone()
        lora_matmul(self.x, self.ids, self.stack_a, self.stack_b, self.ranks, self.scalings, backend,
                    slices=self.slices, out=out)
        return out

    def reference(self) -> torch.Tensor:
        """The `torch` backend in fp32 on upcast inputs."""
        out = self.base.float().clone()
        lora_matmul(self.x.float(), self.ids, self.stack_a.float(), self.stack_b.float(), self.ranks, self.scalings,
                    "torch", slices=self.slices, out=out)
        return out


def make_case(tokens: int, hidden: int, slices: tuple[int, ...], ranks: list[list[int]], max_rank: int,
              dtype: torch.dtype, device: str, seed: int, no_adapter: float = 0.2) -> Case:
    """`ranks[j][n]` is slot n's rank on slice j; tokens pick slots at random, a share `no_adapter` of them -1."""
    g = torch.Generator().manual_seed(seed)
    n_slots, n_slices = len(ranks[0]), len(slices)
    x = torch.randn(tokens, hidden, generator=g)
    stack_a = torch.randn(n_slots, n_slices * max_rank, hidden, generator=g) / hidden**0.5
    stack_b = torch.randn(n_slots, sum(slices), max_rank, generator=g) / max_rank**0.5
    col = 0
    for j, width in enumerate(slices):
        for n in range(n_slots):
            r = ranks[j][n]
            stack_a[n, j * max_rank + r : (j + 1) * max_rank] = float("nan")
            stack_b[n, col : col + width, r:] = float("nan")
        col += width
    ids = torch.randint(0, n_slots, (tokens,), generator=g)
    ids[torch.rand(tokens, generator=g) < no_adapter] = -1
    opts = dict(dtype=dtype, device=device)
    return Case(
        x=x.to(**opts), ids=ids.to(device), stack_a=stack_a.to(**opts), stack_b=stack_b.to(**opts),
        ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
        scalings=(torch.rand(n_slots, generator=g) + 0.5).to(device), slices=slices,
        base=torch.randn(tokens, sum(slices), generator=g).to(**opts),
    )


def assert_matches(case: Case, out: torch.Tensor) -> None:
    ref = case.reference()
    rtol, atol = TOLERANCES[out.dtype]
    scale = (ref - case.base.float()).abs().max().item()
    assert torch.isfinite(out).all(), "non-finite output: garbage leaked from padded rows"
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol * max(scale, 1e-6))
    untouched = case.ids < 0
    assert torch.equal(out[untouched], case.base[untouched]), "tokens without an adapter were modified"
