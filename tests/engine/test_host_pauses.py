"""The step log's host pauses (engine/host_pauses.py): time in garbage collections within a step's window, and the
record keeps them through the step log."""

from __future__ import annotations

import gc

import pytest
import torch

from valora.engine.host_pauses import HostPauses


def test_collections_within_a_step_are_counted_and_retries_are_zero_without_cuda():
    pauses = HostPauses(torch.device("cpu"))
    mark = pauses.mark()
    cycles = [[] for _ in range(100_000)]
    for c in cycles:
        c.append(c)  # reference cycles: only the collector frees them
    del cycles
    assert gc.collect() > 50_000
    gc_s, retries = pauses.take(mark, 1.0)
    assert gc_s > 0 and retries == 0
    assert pauses.take(pauses.mark(), 1.0)[0] == 0  # a step launched after it saw none


def test_a_step_record_keeps_its_pauses_through_the_log():
    from valora.orchestrator.policy import StepRecord

    r = StepRecord("unmerged", None, 2, 2, 1.5, 0.0, gc_s=0.4, alloc_retries=3, capture_s=0.1, launch_s=0.2)
    back = StepRecord.from_json(r.to_json())
    assert (back.gc_s, back.alloc_retries, back.launch_s) == (0.4, 3, 0.2)
    assert back.compute_s == pytest.approx(1.4)  # a capture is no part of the step's own work
