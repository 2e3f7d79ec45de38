"""What one GPU's steps cost, from measurements: the simulator charges these and nothing else.

- Decode: `engine_speed_h100.json`'s CUDA-graph rows (wall time per step, host included) by batch size and
  distinct adapters in the batch, interpolated between the measured points.
- Prompt tokens: its prefill rows (one request of 512, 2048, 8192 tokens), interpolated; below 512 the line
  through the first two.
- Images and prefill steps: a step that admits prompts runs eagerly and encodes their images. Its fixed part
  (`prefill_step_ms`) and its part per image (`image_ms`) are fitted on the server's own step counters in a
  measured sweep (`fit_prefill`), because the engine benchmark times one image at a time (its TTFT), which
  cannot split the two; the TTFT is kept beside them as a check.
- Adapter loads: a slot filled from disk at the bandwidth the engine loaded the whole model at
  (`engine_smoke_h100.json`); from the host cache at `copy_gbps` (not measured: PCIe Gen5 pinned copies).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ModelShape:
    """The language model the costs were measured on, for adapter sizes."""

    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    params: float  # LM and vision tower: the bytes of a whole-model load
    dtype_bytes: int = 2

    def adapter_bytes(self, rank: int) -> int:
        """A (rank x in) and B (out x rank) of q, k, v, o, gate, up and down in every layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        per_rank = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
        return rank * per_rank * self.layers * self.dtype_bytes


QWEN2_VL_7B = ModelShape(hidden=3584, intermediate=18944, layers=28, kv_dim=512, params=8.29e9)


@dataclass(frozen=True)
class StepCosts:
    decode_batches: tuple[int, ...]
    decode_base_ms: tuple[float, ...]  # no adapter, per measured batch
    lora_extra_ms: dict[int, dict[int, float]]  # distinct adapters -> batch -> ms over the base step
    lora_rank_factor: float  # LoRA kernel time at the served adapters' largest rank over the measured rows' rank
    prefill_tokens: tuple[int, ...]
    prefill_ms: tuple[float, ...]
    load_gbps: float  # disk -> GPU slot
    prefill_step_ms: float = 0.0  # fitted: a step that admits prompts, beyond their tokens
    image_ms: float = 0.0  # fitted: per image in it
    waiting_ms: float = 0.0  # fitted: per step, per request in the waiting queue (the scheduler's scan)
    copy_gbps: float = 25.0  # host cache -> GPU slot
    ttft_ms: float | None = None  # one image request alone, measured: a check on prefill_step_ms + image_ms
    ttft_prompt_tokens: int = 290
    source: dict[str, str] = field(default_factory=dict)

    def decode_step_ms(self, batch: int, distinct: int) -> float:
        """A decode step of `batch` sequences using `distinct` adapters (0: none)."""
        if batch <= 0:
            return 0.0
        base = float(np.interp(batch, self.decode_batches, self.decode_base_ms))
        if distinct <= 0:
            return base
        levels = sorted(self.lora_extra_ms)
        extra = [float(np.interp(batch, *zip(*sorted(self.lora_extra_ms[d].items())))) for d in levels]
        return base + self.lora_rank_factor * float(np.interp(distinct, levels, extra))

    def prompt_ms(self, tokens: int) -> float:
        """The token part of a prefill of `tokens` prompt tokens: the measured rows, extended linearly."""
        if tokens <= 0:
            return 0.0
        t, ms = self.prefill_tokens, self.prefill_ms
        i = 0 if tokens < t[1] else len(t) - 2 if tokens > t[-2] else int(np.searchsorted(t, tokens)) - 1
        return max(0.0, ms[i] + (ms[i + 1] - ms[i]) / (t[i + 1] - t[i]) * (tokens - t[i]))

    def step_ms(self, decoding: int, distinct: int, prompt_tokens: int, images: int, waiting: int) -> float:
        """One engine step: scan `waiting` queued requests, decode the running batch and, when it admits prompts,
        prefill them with their images."""
        ms = self.decode_step_ms(decoding, distinct) + self.waiting_ms * waiting
        if prompt_tokens:
            ms += self.prefill_step_ms + self.prompt_ms(prompt_tokens) + self.image_ms * images
        return ms

    def load_ms(self, nbytes: int, from_disk: bool) -> float:
        return nbytes / ((self.load_gbps if from_disk else self.copy_gbps) * 1e9) * 1e3

    @classmethod
    def from_results(cls, results: Path, max_rank: int = 64, shape: ModelShape = QWEN2_VL_7B) -> StepCosts:
        """The measured parts: decode, prefill and TTFT from `engine_speed_h100.json`, the rank factor from
        `lora_ops_h100.json`, the load bandwidth from `engine_smoke_h100.json`. The fitted parts are zero."""
        paths = {name: results / f"{name}_h100.json" for name in ("engine_speed", "engine_smoke", "lora_ops")}
        speed, smoke, ops = (json.loads(p.read_text()) for p in paths.values())
        base = {r["batch"]: r["valora_ms"] for r in speed["decode"] if not r["adapters"]}
        extra: dict[int, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in speed["decode"]:
            if r["adapters"]:
                extra[r["distinct_adapters"]][r["batch"]].append(r["valora_ms"] - base[r["batch"]])
        prefill = sorted((r["tokens"], r["valora_ms"]) for r in speed["prefill"])
        return cls(
            decode_batches=tuple(sorted(base)), decode_base_ms=tuple(base[b] for b in sorted(base)),
            lora_extra_ms={d: {b: float(np.mean(v)) for b, v in by.items()} for d, by in extra.items()},
            lora_rank_factor=lora_rank_factor(ops, speed["rank"], max_rank),
            prefill_tokens=tuple(t for t, _ in prefill), prefill_ms=tuple(ms for _, ms in prefill),
            load_gbps=shape.params * shape.dtype_bytes / smoke["rows"]["valora_load_s"] / 1e9,
            ttft_ms=speed.get("ttft", {}).get("valora_ms"),
            source={name: f"{p.name} ({d.get('device')}, {d.get('commit')})"
                    for (name, p), d in zip(paths.items(), (speed, smoke, ops))},
        )

    def to_dict(self) -> dict:
        return {k: ({str(d): {str(b): v for b, v in m.items()} for d, m in v.items()} if k == "lora_extra_ms" else v)
                for k, v in asdict(self).items()}


# One decoder layer's LoRA launches by kind in lora_ops' grid: q and o, k and v, gate and up, down.
_LAYER_COUNTS = {"q/o 3584>3584": 2, "k/v 3584>512": 2, "gate/up 3584>18944": 2, "down 18944>3584": 1}


def lora_rank_factor(ops: dict, measured_rank: int, rank: int, adapters: int = 16, tokens: tuple[int, ...] = (32, 128)
                     ) -> float:
    """How much longer a decoder layer's ATMM launches take at `rank` than at `measured_rank` (lora_ops' grid,
    `adapters` adapters, averaged over decode-sized token counts)."""
    def layer_us(r: int) -> float:
        cases = [g for g in ops["grid"] if g["ranks"] == str(r) and g["adapters"] == adapters
                 and g["tokens"] in tokens and g["layer"] in _LAYER_COUNTS]
        if not cases:
            raise ValueError(f"lora_ops has no rank-{r} cases with {adapters} adapters at {tokens} tokens")
        return sum(_LAYER_COUNTS[g["layer"]] * g["us"]["atmm"] for g in cases)

    return layer_us(rank) / layer_us(measured_rank)
