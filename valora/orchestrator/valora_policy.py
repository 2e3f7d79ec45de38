"""VaLoRA's policy: pick the step's mode by modelled cost, keep every request's wait bounded.

Cost model (seconds per step, from the device's measured bandwidth and matmul rate): an adapter applied to n
tokens reads its weights once and does 2·n FLOPs per weight, max(bytes / bandwidth, n·bytes / flop_rate), plus a
fixed launch cost per LoRA pass. Unmerged, every adapter pays for its own tokens. Mixture with hot adapter h:
h's tokens are free, every other token subtracts h (one pass over h for those tokens), other adapters pay as
before. Merging a new adapter costs one pass over the weights it targets (read W, write W'), amortised over
`horizon_steps`; returning to unmerged is free (the checkpoint weights are untouched).

Fairness: a waiting request whose wait reaches `max_wait_ms`, or whose deadline is near, is admitted first
(earliest deadline first); after those come the hot adapter's requests, then everyone else in arrival order.
Running requests always run: mixture mode serves any mix of adapters, so nothing needs pausing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from valora.orchestrator.policy import Decision, Policy, SchedulerView, Sequence, StepRecord


@dataclass(frozen=True)
class DeviceRates:
    bandwidth: float  # bytes / s
    flops: float  # FLOP / s
    launch_s: float  # fixed cost of one LoRA pass over the model's layers

    @staticmethod
    def measure(device: torch.device) -> DeviceRates:
        """Copy bandwidth and bf16 matmul rate, measured once in a few milliseconds; nominal values on CPU."""
        if device.type != "cuda":
            return DeviceRates(bandwidth=2e10, flops=2e11, launch_s=2e-4)
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


class ValoraPolicy(Policy):
    name = "valora"
    lora_backend = "atmm"
    merges = True
    OPTIONS = ("max_wait_ms", "horizon_steps", "rates", "deadline_slack_ms")

    def __init__(self, max_wait_ms: float = 1000.0, horizon_steps: int = 8, rates: DeviceRates | None = None,
                 deadline_slack_ms: float = 100.0) -> None:
        self.max_wait_s = max_wait_ms / 1e3
        self.horizon = max(horizon_steps, 1)
        self.rates = rates or DeviceRates.measure(torch.device("cpu"))
        self.slack_s = deadline_slack_ms / 1e3
        self.seconds_per_merged_byte: float | None = None  # learned from measured switches

    # -- cost model -----------------------------------------------------------------------------------------
    def _lora_s(self, nbytes: int, tokens: int) -> float:
        return max(nbytes / self.rates.bandwidth, tokens * nbytes / self.rates.flops) if tokens else 0.0

    def step_cost(self, tokens: dict[str | None, int], hot: str | None, adapter_bytes) -> float:
        total = sum(tokens.values())
        others = sum(self._lora_s(adapter_bytes(a), n) for a, n in tokens.items() if a is not None and a != hot)
        passes = int(others > 0)
        cost = others
        if hot is not None and total - tokens.get(hot, 0) > 0:
            cost += self._lora_s(adapter_bytes(hot), total - tokens.get(hot, 0))
            passes += 1
        return cost + passes * self.rates.launch_s

    def switch_cost(self, merged_bytes: int) -> float:
        per_byte = self.seconds_per_merged_byte or 2.0 / self.rates.bandwidth  # read W, write W'
        return merged_bytes * per_byte

    # -- decision -------------------------------------------------------------------------------------------
    def _urgent(self, seq: Sequence, now: float) -> bool:
        if seq.deadline is not None and seq.deadline - now <= self.slack_s:
            return True
        return now - seq.arrival_time >= self.max_wait_s

    def decide(self, view: SchedulerView) -> Decision:
        now = view.now
        urgent = sorted((s for s in view.waiting if self._urgent(s, now)),
                        key=lambda s: (s.deadline if s.deadline is not None else s.arrival_time + self.max_wait_s))
        rest = [s for s in view.waiting if s not in set(urgent)]
        tokens: dict[str | None, int] = {}
        for s in view.running:
            tokens[s.lora_name] = tokens.get(s.lora_name, 0) + 1
        seats, budget = view.max_num_seqs - len(view.running), view.max_batched_tokens - len(view.running)
        for s in urgent + rest:  # who would be admitted, approximately (KV blocks are the scheduler's business)
            need = len(s) - s.num_computed
            if seats <= 0 or need > budget:
                break
            tokens[s.lora_name] = tokens.get(s.lora_name, 0) + need
            seats, budget = seats - 1, budget - need
        candidates = {None, view.hot} | {a for a in sorted(tokens, key=lambda a: -tokens[a])[:3] if a is not None}
        best, best_cost = None, float("inf")
        for h in candidates:
            if h is not None and h not in tokens and h != view.hot:
                continue
            cost = self.step_cost(tokens, h, view.adapter_bytes)
            if h is not None and h != view.hot:
                cost += self.switch_cost(view.merge_bytes(h)) / self.horizon
            if cost < best_cost - 1e-12 or (cost <= best_cost + 1e-12 and h == view.hot):
                best, best_cost = h, cost
        order = urgent + [s for s in rest if s.lora_name == best] + [s for s in rest if s.lora_name != best]
        return Decision(hot=best, admit_order=order)

    def observe(self, record: StepRecord) -> None:
        if record.switch_s > 0 and record.merged_bytes > 0:
            measured = record.switch_s / record.merged_bytes
            prev = self.seconds_per_merged_byte
            self.seconds_per_merged_byte = measured if prev is None else 0.8 * prev + 0.2 * measured
