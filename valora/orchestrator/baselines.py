"""Baseline policies, built to their authors' designs so comparisons are honest.

- `slora`: unmerged only, first come first served, segment (SGMV-style) LoRA kernel.
- `punica`: unmerged only, first come first served, per-token (BGMV-style) LoRA kernel.
- `dlora`: dLoRA's credit scheduler (OSDI'24 and its artifact, `_credit_schedule`): every iteration it picks
  among a first-come-first-served unmerged batch, merging the adapter with the most queued requests, or staying
  merged; it merges when that adapter's queue reaches `right` x the FCFS batch and stays while it is at least
  `left` x; both thresholds adapt by AIMD from the modelled throughput of each mode (profiled step times and a
  switch cost); credits move to adapters passed over out of FCFS order, and an adapter whose credit crosses a
  threshold is served first. In merged mode only the merged adapter's requests run: dLoRA has no mixture mode,
  so other running requests pause (keeping their KV cache).
"""

from __future__ import annotations

from valora.orchestrator.policy import Decision, Policy, SchedulerView, Sequence, StepRecord


class SLoRAPolicy(Policy):
    name = "slora"
    lora_backend = "sgmv"

    def decide(self, view: SchedulerView) -> Decision:
        return Decision()


class PunicaPolicy(Policy):
    name = "punica"
    lora_backend = "bgmv"

    def decide(self, view: SchedulerView) -> Decision:
        return Decision()


class DLoRAPolicy(Policy):
    name = "dlora"
    lora_backend = "gather"  # dLoRA's unmerged path gathers padded adapter weights per token (an einsum)
    merges = True
    OPTIONS = ("merge_step_s", "unmerge_step_s", "switch_cost_s")
    CREDIT_UNIT = 10000.0  # the artifact's credit scale

    def __init__(self, merge_step_s: float = 0.015, unmerge_step_s: float = 0.027, switch_cost_s: float = 0.02,
                 aimd_add: float = 0.05, aimd_mul: float = 1.1) -> None:
        # Profiled on Llama-7B by the authors: a merged step, an unmerged step, one switch.
        self.merge_step_s, self.unmerge_step_s, self.switch_cost_s = merge_step_s, unmerge_step_s, switch_cost_s
        self.speed_rate = merge_step_s / unmerge_step_s
        self.right, self.left = 1.0, self.speed_rate  # merge / stay-merged thresholds
        self.aimd_add, self.aimd_mul = aimd_add, aimd_mul
        self.credit: dict[str, float] = {}
        self.previously_credited: set[str] = set()
        self.merged_on: str | None = None
        self.iters = self.merged_count = self.unmerged_count = self.virtual_switches = 0
        self.last_max: str | None = None

    def _thresholds(self) -> tuple[float, float]:
        right = self.CREDIT_UNIT * max(len(self.credit), 1)
        return right, right - self.CREDIT_UNIT / 2

    def _register(self, name: str) -> None:
        """Credits start one unit below the serve-first threshold (unit x adapters), as the artifact sets them for
        a known adapter count; a newly seen adapter raises everyone's start, keeping each one's distance."""
        if name in self.credit:
            return
        for key in self.credit:
            self.credit[key] += self.CREDIT_UNIT
        self.credit[name] = self.CREDIT_UNIT * len(self.credit)

    def _adapt(self) -> None:
        """AIMD on the thresholds from the modelled throughput of the last run of iterations."""
        if self.iters == 0:
            return
        t_merge, t_unmerge = self.merge_step_s * self.iters, self.unmerge_step_s * self.iters
        if self.merged_on is not None:
            t_merge += self.switch_cost_s
        else:
            t_unmerge += self.switch_cost_s
            t_merge += self.switch_cost_s * self.virtual_switches
        tput_merge, tput_unmerge = self.merged_count / t_merge, self.unmerged_count / t_unmerge
        if self.merged_on is not None:
            if tput_merge > tput_unmerge and self.right - self.aimd_add > self.left:
                self.right -= self.aimd_add
            elif tput_merge < tput_unmerge:
                self.right *= self.aimd_mul
        elif tput_unmerge > tput_merge and self.left + self.aimd_add < self.right:
            self.left += self.aimd_add
        elif tput_unmerge < tput_merge:
            self.left /= self.aimd_mul
        self.merged_count = self.unmerged_count = self.virtual_switches = 0
        self.last_max = None

    def _move_credit(self, fcfs: list[Sequence], chosen: list[Sequence], cost: float) -> None:
        """Adapters served out of FCFS order pay credit to those they passed over."""
        fcfs_set, chosen_set = set(fcfs), set(chosen)
        if len(fcfs) == len(chosen):
            extra = [s for s in chosen if s not in fcfs_set]
            skipped = [s for s in fcfs if s not in chosen_set]
            for taken, passed in zip(extra, skipped):
                self.credit[taken.lora_name or ""] -= cost
                self.credit[passed.lora_name or ""] += cost
        elif chosen:
            head = chosen[0].lora_name or ""
            for passed in (s for s in fcfs if s not in chosen_set):
                self.credit[head] -= cost / 2
                self.credit[passed.lora_name or ""] += cost / 2

    def decide(self, view: SchedulerView) -> Decision:
        queued = sorted([*view.running, *view.waiting], key=lambda s: (s.arrival_time, s.seq_id))
        if not queued:
            return Decision(hot=self.merged_on)
        cap = view.max_num_seqs
        for s in queued:
            self._register(s.lora_name or "")
        right_c, left_c = self._thresholds()
        fcfs = queued[:cap]
        by_adapter: dict[str, list[Sequence]] = {}
        for s in queued:
            by_adapter.setdefault(s.lora_name or "", []).append(s)
        credited: list[Sequence] = []
        credited_names: set[str] = set()
        for name, value in sorted(self.credit.items(), key=lambda kv: -kv[1]):
            if value < left_c or len(credited) >= cap:
                break
            if value >= right_c or (name in self.previously_credited and value >= left_c):
                credited += by_adapter.get(name, [])[: cap - len(credited)]
                credited_names.add(name)
        self.previously_credited = credited_names
        hot = None
        if not credited:
            eligible = {a: reqs for a, reqs in by_adapter.items() if a and self.credit[a] >= 0.0}
            top = max(eligible, key=lambda a: len(eligible[a]), default=None)
            if self.merged_on in eligible and len(eligible[self.merged_on]) >= self.left * len(fcfs):
                hot, self.iters = self.merged_on, self.iters + 1
                batch = eligible[hot][:cap]
                self._move_credit(fcfs, batch, 1.0 / (self.speed_rate * cap))
            elif top is not None and len(eligible[top]) >= self.right * len(fcfs):
                self._adapt()
                hot, self.iters = top, 1
                batch = eligible[top][:cap]
                self._move_credit(fcfs, batch, 1.0 / (self.speed_rate * cap))
            else:
                if top is not None and top != self.last_max:
                    self.virtual_switches += 1
                    self.last_max = top
                batch = fcfs
            self.merged_count += min(len(eligible.get(top, [])), cap) if top else 0
            self.unmerged_count += len(fcfs)
        else:
            batch = credited + [s for s in fcfs if s not in set(credited)][: cap - len(credited)]
            self._move_credit(fcfs, batch, 1.0 / cap)
        if hot is None:
            if self.merged_on is not None:
                self._adapt()
                self.iters = 1
            else:
                self.iters += 1
        self.merged_on = hot
        chosen = set(batch)
        return Decision(
            hot=hot,
            paused=frozenset(s for s in view.running if s not in chosen),
            admit_order=[s for s in batch if s in set(view.waiting)],
        )

    def observe(self, record: StepRecord) -> None:
        """dLoRA models step times from its profile, not from measurements; nothing to learn here."""
