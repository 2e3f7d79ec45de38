"""The optimisation loop: AdamW with warm-up and cosine decay, a progress bar, seeded batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from valora.training.specs import TrainSpec


def fit(module: torch.nn.Module, loss_of: Callable[[torch.Generator], torch.Tensor], spec: TrainSpec,
        desc: str) -> float:
    """Minimise `loss_of(generator)` (which draws its own batch) over the trainable parameters of `module`;
    returns the last loss. Batches come from one generator seeded with `spec.seed`, so a run is reproducible."""
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / spec.warmup) * 0.5 * (
        1 + math.cos(math.pi * s / spec.steps)))
    gen = torch.Generator().manual_seed(spec.seed)
    module.train()
    loss_value = float("nan")
    with tqdm(range(spec.steps), desc=desc, unit="step", leave=True) as bar:
        for _ in bar:
            loss = loss_of(gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    module.eval()
    return loss_value
