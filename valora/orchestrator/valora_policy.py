"""VaLoRA's policy: pick the step's mode by its predicted cost on this device, keep every request's wait bounded.

Cost (`cost_model.StepCostModel`): a step's seconds are a linear model of its work (tokens, sequences, and per LoRA
pass its launches, the adapters and bytes it reads and the token-bytes it computes), fitted online to the
engine's own steps, per path (CUDA graph or eager), and seeded by a table recorded on this device or by its
measured rates. Each step the policy prices the coming batch unmerged and with each candidate merged (the current
hot adapter and the three adapters with the most tokens) over `horizon_steps`: this step, then decodes of the batch
it leaves (a step that admits prompts is one of prefill work and many of decoding); merging a new adapter adds the
measured switch cost (seconds per rewritten byte, learned from the switches so far) spread over the same steps;
returning to unmerged and re-merging the adapter the shadow weights still hold are free. Candidates are compared
at their prediction minus `explore` standard deviations, so a mode whose cost the steps seen so far leave open gets
tried, and is then priced by what it measured. The mode in place is kept unless another one's bound beats it by a
`hysteresis` share of its cost: two modes priced alike (a small batch, where a mixture saves about what its extra
pass costs) would otherwise trade places every step as each one's measurements narrow its deviation.

Fairness: a waiting request whose wait reaches `max_wait_ms`, or whose deadline is near, is admitted first
(earliest deadline first); after those come the hot adapter's requests, then everyone else in arrival order.
Running requests always run: mixture mode serves any mix of adapters, so nothing needs pausing.
"""

from __future__ import annotations

import torch

from valora.orchestrator.cost_model import CostTable, DeviceRates, StepCostModel, StepWork
from valora.orchestrator.policy import Decision, Policy, SchedulerView, Sequence, StepRecord


class ValoraPolicy(Policy):
    name = "valora"
    lora_backend = "atmm"
    merges = True
    OPTIONS = ("max_wait_ms", "horizon_steps", "rates", "costs", "deadline_slack_ms", "explore",
               "hysteresis")
    DEFAULT_WEIGHT_BYTES = 2 << 30  # prices the seed when the engine gives no cost model

    def __init__(self, max_wait_ms: float = 1000.0, horizon_steps: int = 8, rates: DeviceRates | None = None,
                 costs: StepCostModel | None = None, deadline_slack_ms: float = 100.0, explore: float = 1.0,
                 hysteresis: float = 0.05) -> None:
        self.max_wait_s = max_wait_ms / 1e3
        self.horizon = max(horizon_steps, 1)
        self.rates = rates or DeviceRates.measure(torch.device("cpu"))
        self.costs = costs or StepCostModel(CostTable.analytic(self.rates, self.DEFAULT_WEIGHT_BYTES))
        self.slack_s = deadline_slack_ms / 1e3
        self.explore = explore
        self.hysteresis = hysteresis
        self.seconds_per_merged_byte: float | None = None  # learned from measured switches
        self.decode_path = "eager"  # where the last decode-only step ran
        self.prefill_path = "eager"  # where the last step with prefill work ran (token-bucket graphs or eagerly)

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
        flagged = [self._urgent(s, now) for s in view.waiting]  # one pass: this runs every step over the queue
        urgent = sorted((s for s, f in zip(view.waiting, flagged) if f),
                        key=lambda s: (s.deadline if s.deadline is not None else s.arrival_time + self.max_wait_s))
        rest = [s for s, f in zip(view.waiting, flagged) if not f]
        tokens: dict[str | None, int] = {}
        attention = 0
        for s in view.running:
            tokens[s.lora_name] = tokens.get(s.lora_name, 0) + 1
            attention += len(s)
        decodes, context = dict(tokens), attention  # the steps after this one: every sequence decodes a token
        seats, budget = view.max_num_seqs - len(view.running), view.max_batched_tokens - len(view.running)
        seqs = len(view.running)
        for s in urgent + rest:  # who would be admitted, approximately (KV blocks are the scheduler's business)
            need = len(s) - s.num_computed
            if seats <= 0 or need > budget:
                break
            tokens[s.lora_name] = tokens.get(s.lora_name, 0) + need
            decodes[s.lora_name] = decodes.get(s.lora_name, 0) + 1
            attention += need * len(s)
            context += len(s)
            seats, budget, seqs = seats - 1, budget - need, seqs + 1
        named = [a for a in tokens if a is not None]
        candidates = dict.fromkeys([None, view.hot, *sorted(named, key=lambda a: -tokens[a])[:3]])
        nbytes = {a: view.adapter_bytes(a) for a in {*named, view.hot} if a is not None}
        priced = self._price(self.decode_path, decodes, seqs, context, candidates, nbytes, view.hot)
        if seqs != len(view.running):
            # A mode is chosen for `horizon` steps, the switch into it spread over them: this one, with its prompt
            # work, and the decodes after it. A mixture that pays only for one prefill step, and then costs the
            # decodes its extra pass, is no reason to merge (on the H100 such merges, undone at the next decode,
            # made 600 switches in 45 s of VQA at 24 req/s).
            now = self._price(self.prefill_path, tokens, seqs, attention, candidates, nbytes, view.hot)
            priced = [((c0 + (self.horizon - 1) * c1) / self.horizon, (s0 + (self.horizon - 1) * s1) / self.horizon)
                      for (c0, s0), (c1, s1) in zip(now, priced)]
        costs: dict[str | None, float] = {}
        bounds: dict[str | None, float] = {}
        for h, (cost, std) in zip(candidates, priced):
            if h is not None and h not in (view.hot, view.held):
                cost += self.switch_cost(view.merge_bytes(h)) / self.horizon
            costs[h] = cost
            bounds[h] = cost - self.explore * std  # optimism: a cost the steps so far leave open is worth a try
        best = min(bounds, key=bounds.__getitem__)
        if bounds[best] >= bounds[view.hot] - self.hysteresis * costs[view.hot]:
            best = view.hot  # not worth a change of mode
        order = urgent + [s for s in rest if s.lora_name == best] + [s for s in rest if s.lora_name != best]
        return Decision(hot=best, admit_order=order, costs=costs)

    def _price(self, path: str, tokens: dict[str | None, int], seqs: int, attention: int,
               candidates: dict[str | None, None], nbytes: dict[str, int], hot: str | None
               ) -> list[tuple[float, float]]:
        """(seconds, deviation against the mode in place) of one step's work under each candidate hot adapter."""
        return self.costs.price(path, [StepWork(tokens, seqs, h, nbytes, attention=attention) for h in candidates],
                                versus=StepWork(tokens, seqs, hot, nbytes, attention=attention))

    def predict(self, record: StepRecord) -> float | None:
        return self.costs.predict(record.path, record.work) if record.work is not None else None

    def observe(self, record: StepRecord) -> None:
        if record.switch_s > 0 and record.merged_bytes > 0:
            measured = record.switch_s / record.merged_bytes
            prev = self.seconds_per_merged_byte
            self.seconds_per_merged_byte = measured if prev is None else 0.8 * prev + 0.2 * measured
        if record.work is None:
            return
        if record.decode:
            self.decode_path = record.path
        else:
            self.prefill_path = record.path
        self.costs.observe(record.path, record.work, record.compute_s)
