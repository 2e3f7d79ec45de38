"""Step time as the `valora` policy prices it: a linear model of what a step does, fitted to the steps the engine
actually ran on this device.

A step's time is the base model's work (a fixed cost, a cost per token and per sequence, the vision tower's cost
per image token it encodes), the LoRA work of each pass over the adapter stacks (one pass for tokens of their own
adapter, one more in mixture mode to take the merged adapter back out of the other tokens: a fixed cost per pass,
its launches; a cost per adapter it reads; per byte of adapter weights it reads; per token-byte it computes), and
the adapter copies into GPU slots the step waits for. The coefficients are measured, never derived: a kernel's
time is its roofline times a factor that depends on shapes, device and whether it runs inside a CUDA graph (on
the H100 the LoRA kernels cost about 3.4x their bytes over the bandwidth inside graphs, plus a fixed cost per
launch, docs/benchmarks.md), and a model priced from rates alone almost never saw a reason to merge.

One fit per path (`graph`: a step replayed from CUDA graphs, i.e. a decode step or a step with prefill work within
the token buckets, mixed with decodes or not; `eager`: everything else), because graphs remove the launch costs that
dominate small LoRA passes. Each fit is least squares with non-negative coefficients,
over a window of the most recent steps plus a seed: a table recorded on this device (`valora bench costs --fit`),
or, without one, pseudo-steps priced from the measured copy bandwidth and matmul rate. Errors are relative (a 5 ms
decode step counts as much as a 200 ms prefill), relative to the step's *predicted* time: weights taken from the
noisy measurement itself would favour the fast outliers and predict low. The seed counts as a few steps, so the
device's own steps overrule it where they say anything; where they say nothing (a cost the policy has never
tried, such as a merged step when it has only run unmerged ones) the seed decides, and `std` says how unsure
that is.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

TABLE_DIR = Path(__file__).parent / "step_costs"
PATHS = ("graph", "eager")
FEATURES: tuple[tuple[str, str], ...] = (  # (name, unit): coefficients are seconds per unit
    ("step", "step"),
    ("tokens", "token"),
    ("seqs", "sequence"),
    ("attention_m", "million query-key pairs"),
    ("image_tokens", "image token encoded"),
    ("lora_passes", "LoRA pass"),
    ("lora_adapters", "adapter read by a pass"),
    ("lora_gb", "GB of adapter weights read"),
    ("lora_token_gb", "token x GB of its adapter"),
    ("slot_load_gb", "GB copied into adapter slots"),
)
_MIN_SECONDS = 1e-5  # relative errors of shorter steps are noise
_MAX_RATIO = 8.0  # a step measured this many times its prediction (or a fraction of it) counts as this: a host
#                   stall must not move the model as much as it would in plain least squares


@dataclass(frozen=True)
class StepWork:
    """What one step computes, as far as its time goes."""

    tokens: Mapping[str | None, int]  # new tokens per adapter (None: no adapter)
    seqs: int
    hot: str | None  # the adapter merged into the weights
    adapter_bytes: Mapping[str, int]  # weights of every adapter in `tokens` and of `hot`
    image_tokens: int = 0  # image tokens the vision tower encoded (embedding cache hits excluded)
    slot_load_bytes: int = 0  # adapter weights copied into GPU slots for this step
    attention: int = 0  # query-key pairs: each sequence's new tokens times the context they reach

    def features(self) -> np.ndarray:
        hot, nbytes = self.hot, self.adapter_bytes
        total = adapters = gb = token_gb = 0
        for a, n in self.tokens.items():
            total += n
            if a is not None and a != hot and n > 0:
                adapters, gb, token_gb = adapters + 1, gb + nbytes[a], token_gb + n * nbytes[a]
        own = adapters > 0
        corrected = total - self.tokens.get(hot, 0) if hot is not None else 0
        if corrected > 0:  # mixture: every token not the hot adapter's subtracts it
            adapters, gb, token_gb = adapters + 1, gb + nbytes[hot], token_gb + corrected * nbytes[hot]
        return np.array([1.0, total, self.seqs, self.attention / 1e6, self.image_tokens, own + (corrected > 0),
                         adapters, gb / 1e9, token_gb / 1e9, self.slot_load_bytes / 1e9])

    def to_json(self) -> dict[str, Any]:
        return {"tokens": {a or "": n for a, n in self.tokens.items()}, "seqs": self.seqs, "hot": self.hot,
                "adapter_bytes": dict(self.adapter_bytes), "image_tokens": self.image_tokens,
                "slot_load_bytes": self.slot_load_bytes, "attention": self.attention}

    @staticmethod
    def from_json(d: dict[str, Any]) -> StepWork:
        return StepWork({a or None: n for a, n in d["tokens"].items()}, d["seqs"], d["hot"], d["adapter_bytes"],
                        d.get("image_tokens", 0), d.get("slot_load_bytes", 0), d.get("attention", 0))


@dataclass(frozen=True)
class DeviceRates:
    """Copy bandwidth, bf16 matmul rate and the fixed cost of one LoRA pass: what the seed prices steps with on a
    device that has no recorded table."""

    bandwidth: float  # bytes / s
    flops: float  # FLOP / s
    launch_s: float  # one LoRA pass over the model's layers
    host_copy: float = 2.5e10  # bytes / s into GPU slots

    @staticmethod
    def measure(device: torch.device) -> DeviceRates:
        """Measured once in a few milliseconds on a GPU; nominal values on CPU."""
        if device.type != "cuda":
            return DeviceRates(bandwidth=2e10, flops=2e11, launch_s=2e-4, host_copy=2e10)
        x = torch.empty(64 << 20, dtype=torch.float32, device=device)
        a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
        y = x.clone()
        a @ a
        torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(5):
            y.copy_(x)
        torch.cuda.synchronize(device)
        bw = 5 * 2 * x.numel() * 4 / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(5):
            a @ a
        torch.cuda.synchronize(device)
        flops = 5 * 2 * 4096**3 / (time.perf_counter() - t)
        return DeviceRates(bandwidth=bw, flops=flops, launch_s=1e-3)


@dataclass
class PathStats:
    """The sufficient statistics of a weighted least-squares fit, as means over its steps: of u uᵀ, of u t and of
    t², where u = features / p and t = seconds / p for the step's predicted seconds p. They add up across runs and
    scale to any weight."""

    gram: np.ndarray
    moment: np.ndarray
    sq: float
    steps: int

    def to_json(self, coefficients: np.ndarray, rel_rmse: float) -> dict[str, Any]:
        return {"coefficients": dict(zip((f for f, _ in FEATURES), coefficients.tolist())), "steps": self.steps,
                "rel_rmse": rel_rmse, "gram": self.gram.tolist(), "moment": self.moment.tolist(), "sq": self.sq}

    @staticmethod
    def from_json(d: dict[str, Any]) -> PathStats:
        return PathStats(np.asarray(d["gram"], dtype=float), np.asarray(d["moment"], dtype=float), float(d["sq"]),
                         int(d["steps"]))


@dataclass
class CostTable:
    """A seed for the model: per path, what a set of steps said. Recorded on a device by `valora bench costs
    --fit` and shipped as `step_costs/<device>.json`, or priced from `DeviceRates` (`analytic`). `weight`: how many
    steps of the running engine it counts for."""

    device: str
    paths: dict[str, PathStats]
    weight: float
    info: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def analytic(rates: DeviceRates, weight_bytes: int, weight: float = 4.0) -> CostTable:
        """Pseudo-steps priced from rates: the base model reads its weights once per step and does 2 FLOPs per
        weight per token; a query-key pair costs about 1/40,000 of a token's FLOPs (Qwen2-VL-7B: 4 x hidden x
        layers against 2 x 7B); the vision tower's tokens cost four of the LM's (four patches each); LoRA reads its
        weights at a third of the bandwidth (the measured kernels' share, docs/benchmarks.md), plus one fixed
        cost per pass and a quarter of it per adapter."""
        theta = np.array([weight_bytes / rates.bandwidth + 10 * rates.launch_s, weight_bytes / rates.flops, 0.0,
                          25 * weight_bytes / rates.flops, 4 * weight_bytes / rates.flops, rates.launch_s,
                          rates.launch_s / 4, 3.4e9 / rates.bandwidth, 2e9 / rates.flops, 1e9 / rates.host_copy])
        nbytes = {"a": weight_bytes // 50, "b": weight_bytes // 120, "c": weight_bytes // 300, "d": weight_bytes // 700}
        design = [
            StepWork({None: 1}, 1, None, nbytes, attention=100),
            StepWork({None: 32}, 32, None, nbytes, attention=32 * 2000),
            StepWork({"a": 32}, 32, None, nbytes, attention=32 * 300),
            StepWork({"a": 32}, 32, "a", nbytes, attention=32 * 300),
            StepWork({"a": 8, "b": 8, "c": 8, "d": 8}, 32, None, nbytes, attention=32 * 500),
            StepWork({"a": 24, "b": 4, "c": 2, "d": 2}, 32, "a", nbytes, attention=32 * 500),
            StepWork({"b": 512}, 2, None, nbytes, image_tokens=256, attention=2 * 256**2),
            StepWork({"a": 700, "c": 300}, 3, "a", nbytes, image_tokens=512, slot_load_bytes=nbytes["c"],
                     attention=700**2 + 300**2),
            StepWork({"d": 16}, 16, None, nbytes, slot_load_bytes=nbytes["d"], attention=16 * 100),
        ]
        x = np.stack([w.features() for w in design])
        u = x / (x @ theta)[:, None]  # priced exactly: every t is 1
        stats = PathStats(u.T @ u / len(design), u.mean(axis=0), 1.0, len(design))
        return CostTable("analytic", {p: stats for p in PATHS}, weight, {"rates": rates.__dict__})

    @staticmethod
    def path_for(device_name: str, directory: Path = TABLE_DIR) -> Path:
        return directory / (re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")

    @staticmethod
    def for_device(device_name: str, directory: Path = TABLE_DIR) -> CostTable | None:
        path = CostTable.path_for(device_name, directory)
        return CostTable.load(path) if path.exists() else None

    def to_json(self, fitted: dict[str, tuple[np.ndarray, float]]) -> dict[str, Any]:
        return {"device": self.device, "weight": self.weight, "info": self.info,
                "features": [f"{name}: seconds per {unit}" for name, unit in FEATURES],
                "paths": {p: s.to_json(*fitted[p]) for p, s in self.paths.items()}}

    @staticmethod
    def load(path: Path) -> CostTable:
        d = json.loads(path.read_text())
        return CostTable(d["device"], {p: PathStats.from_json(s) for p, s in d["paths"].items()},
                         float(d.get("weight", 256.0)), d.get("info", {}))


def _nnls(a: np.ndarray, b: np.ndarray, free: np.ndarray) -> np.ndarray:
    """argmin zᵀaz - 2bᵀz over z >= 0 (a positive definite, small): active set on the normal equations, starting
    from the coefficients `free` (the last fit's positive ones: usually still right, so one solve)."""
    d = len(b)
    free = free.copy()
    z = np.zeros(d)
    for _ in range(4 * d):
        z = np.zeros(d)
        idx = np.flatnonzero(free)
        if idx.size:
            z[idx] = np.linalg.solve(a[np.ix_(idx, idx)], b[idx])
        negative = free & (z < 0)
        if negative.any():
            free[np.argmin(np.where(negative, z, np.inf))] = False
            continue
        gain = np.where(free, -np.inf, b - a @ z)  # > 0: raising that fixed coefficient lowers the loss
        if gain.max() <= 1e-12:
            break
        free[np.argmax(gain)] = True
    return np.clip(z, 0.0, None)


class _PathFit:
    """One path's fit over a ring buffer of recent steps plus the seed's statistics."""

    RIDGE = 1e-9  # on the unit-diagonal scaled system: a feature nothing has shown stays at zero
    REWEIGHT = 256  # steps between re-weighting the window by the current model (and at 16, 32, 64, 128)
    REFIT = 4  # steps between solves after the first 16: one step moves the fit by little

    def __init__(self, seed: PathStats, seed_weight: float, window: int) -> None:
        d = len(FEATURES)
        weight = seed_weight if seed.steps else 0.0
        self.seed_gram, self.seed_moment, self.seed_sq = seed.gram * weight, seed.moment * weight, seed.sq * weight
        self.seed_count = weight
        self.x, self.y = np.zeros((window, d)), np.zeros(window)  # the steps: features, seconds
        self.u, self.t = np.zeros((window, d)), np.zeros(window)  # as weighted: x / p, y / p
        self.count = 0  # steps seen
        self.gram, self.moment, self.sq = self.seed_gram.copy(), self.seed_moment.copy(), self.seed_sq
        self._theta: np.ndarray | None = None
        self._free = np.ones(d, dtype=bool)
        self._scale = np.ones(d)
        self._inv = np.eye(d)
        self._rel_var = 0.0

    @property
    def window(self) -> int:
        return len(self.x)

    def _weighted(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(x / p, y / p) for the current prediction p; once the fit rests on a few steps per feature, a step off
        by more than _MAX_RATIO counts as that much."""
        p = np.maximum(x @ self.theta(), _MIN_SECONDS)
        t = y / p
        if self.n >= 2 * len(FEATURES):
            t = np.clip(t, 1 / _MAX_RATIO, _MAX_RATIO)
        return x / p[..., None], t

    def add(self, x: np.ndarray, seconds: float) -> None:
        u, t = self._weighted(x, np.float64(seconds))
        i = self.count % self.window
        if self.count >= self.window:
            self.gram -= np.outer(self.u[i], self.u[i])
            self.moment -= self.u[i] * self.t[i]
            self.sq -= self.t[i] ** 2
        self.x[i], self.y[i], self.u[i], self.t[i] = x, seconds, u, t
        self.gram += np.outer(u, u)
        self.moment += u * t
        self.sq += float(t * t)
        self.count += 1
        if self.count < 16 or self.count % self.REFIT == 0:
            self._theta = None
        if self.count % self.REWEIGHT == 0 or (self.count < self.REWEIGHT and self.count & (self.count - 1) == 0
                                                 and self.count >= 16):
            self.reweight()

    def reweight(self) -> None:
        """Weight the window by the current model (early weights came from a worse one); also ends any drift
        from adding and subtracting."""
        k = min(self.count, self.window)
        self.u[:k], self.t[:k] = self._weighted(self.x[:k], self.y[:k])
        u, t = self.u[:k], self.t[:k]
        self.gram = self.seed_gram + u.T @ u
        self.moment = self.seed_moment + u.T @ t
        self.sq = self.seed_sq + float(t @ t)
        self._theta = None

    @property
    def n(self) -> float:
        return self.seed_count + min(self.count, self.window)

    def stats(self) -> PathStats:
        """The window's own statistics as means (no seed): what a recorded table stores."""
        k = min(self.count, self.window)
        u, t = self.u[:k], self.t[:k]
        n = max(k, 1)
        return PathStats(u.T @ u / n, u.T @ t / n, float(t @ t) / n, k)

    def theta(self) -> np.ndarray:
        if self._theta is None:
            diag = np.diag(self.gram)
            self._scale = np.where(diag > 0, 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0)), 1.0)
            scaled = self.gram * np.outer(self._scale, self._scale) + self.RIDGE * np.eye(len(diag))
            self._theta = self._scale * _nnls(scaled, self.moment * self._scale, self._free)
            self._free = self._theta > 0
            self._inv = np.linalg.inv(scaled)
            t = self._theta
            residual = self.sq - 2 * t @ self.moment + t @ self.gram @ t  # sum of squared relative errors
            self._rel_var = max(residual, 0.0) / max(self.n - len(t), 1.0)
        return self._theta

    def predict(self, x: np.ndarray) -> float:
        return float(x @ self.theta())

    def std(self, x: np.ndarray) -> float:
        """Of the prediction, in seconds: the relative error's variance times the leverage of x."""
        self.theta()
        v = x * self._scale
        return float(np.sqrt(max(self._rel_var * (v @ self._inv @ v), 0.0)))

    def rel_rmse(self) -> float:
        self.theta()
        return float(np.sqrt(self._rel_var))


class StepCostModel:
    """Predicted seconds of a step (switches and graph captures excluded), learned online per path."""

    def __init__(self, seed: CostTable, window: int = 4096) -> None:
        self.seed = seed
        self.window = window
        self.fits: dict[str, _PathFit] = {}

    @staticmethod
    def for_device(device: torch.device, weight_bytes: int, rates: DeviceRates) -> StepCostModel:
        """Seeded by the table recorded for this GPU, else priced from its rates and the model's weight bytes."""
        table = CostTable.for_device(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
        if table is not None:
            logger.info("step costs seeded by %s (%s)", CostTable.path_for(table.device).name, table.info)
        return StepCostModel(table or CostTable.analytic(rates, weight_bytes))

    @staticmethod
    def fit(steps: list[tuple[str, StepWork, float]], seed: CostTable | None = None) -> StepCostModel:
        """A model of (path, work, seconds) steps, all of them in its window, weighted by its own final fit
        (iteratively: the weights come from predictions)."""
        model = StepCostModel(seed or CostTable("none", {}, 0.0), window=max(len(steps), 1))
        for path, work, seconds in steps:
            model.observe(path, work, seconds)
        for fit in model.fits.values():
            for _ in range(3):
                fit.reweight()
        return model

    def _fit(self, path: str) -> _PathFit:
        if path not in self.fits:
            d = len(FEATURES)
            stats = (self.seed.paths.get(path) or next(iter(self.seed.paths.values()), None)
                     or PathStats(np.zeros((d, d)), np.zeros(d), 0.0, 0))
            self.fits[path] = _PathFit(stats, self.seed.weight, self.window)
        return self.fits[path]

    def observe(self, path: str, work: StepWork, seconds: float) -> None:
        self._fit(path).add(work.features(), seconds)

    def predict(self, path: str, work: StepWork) -> float:
        return self._fit(path).predict(work.features())

    def price(self, path: str, works: list[StepWork], versus: StepWork) -> list[tuple[float, float]]:
        """Each step's predicted seconds, and the standard deviation of how much more it costs than `versus`:
        large where the steps seen so far leave that open."""
        fit, base = self._fit(path), versus.features()
        return [(fit.predict(x), fit.std(x - base)) for x in (w.features() for w in works)]

    def coefficients(self, path: str) -> dict[str, float]:
        return dict(zip((f for f, _ in FEATURES), self._fit(path).theta().tolist()))

    def table(self, device: str, info: dict[str, Any] | None = None, weight: float = 256.0) -> dict[str, Any]:
        """What the window says, as a recorded table for `device` (JSON), with the fitted coefficients to read."""
        stats = {p: f.stats() for p, f in self.fits.items() if f.count}
        fitted = {}
        for p in stats:
            fresh = _PathFit(stats[p], float(stats[p].steps), 1)
            fitted[p] = (fresh.theta(), fresh.rel_rmse())
        return CostTable(device, stats, weight, info or {}).to_json(fitted)


@dataclass
class CostTally:
    """Predicted against measured step time, summed over steps of one mode (for /metrics)."""

    RATIO_BUCKETS = (0.5, 0.67, 0.8, 0.87, 0.95, 1.05, 1.15, 1.25, 1.5, 2.0)  # measured / predicted

    steps: int = 0
    predicted_s: float = 0.0
    measured_s: float = 0.0
    abs_error_s: float = 0.0
    ratio_counts: list[int] = field(default_factory=lambda: [0] * (len(CostTally.RATIO_BUCKETS) + 1))
    ratio_sum: float = 0.0

    def add(self, predicted: float, measured: float) -> None:
        self.steps += 1
        self.predicted_s += predicted
        self.measured_s += measured
        self.abs_error_s += abs(measured - predicted)
        ratio = measured / max(predicted, _MIN_SECONDS)
        self.ratio_counts[next((i for i, b in enumerate(self.RATIO_BUCKETS) if ratio <= b), -1)] += 1
        self.ratio_sum += ratio

    def copy(self) -> CostTally:
        return CostTally(self.steps, self.predicted_s, self.measured_s, self.abs_error_s, list(self.ratio_counts),
                         self.ratio_sum)
