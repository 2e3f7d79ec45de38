"""Which adapter is folded into the weights, and which requests run, step by step."""

from valora.orchestrator.policy import Decision, Policy, SchedulerView, make_policy

__all__ = ["Decision", "Policy", "SchedulerView", "make_policy"]
