"""The step log's host pauses (engine/host_pauses.py): time in garbage collections and Triton compilations within
a step's window, and the record keeps them through the step log."""

from __future__ import annotations

import gc
import time
from pathlib import Path

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
    gc_s, compile_s, retries = pauses.take(mark, 1.0)
    assert gc_s > 0 and compile_s == 0 and retries == 0
    assert pauses.take(pauses.mark(), 1.0)[0] == 0  # a step launched after it saw none


def _fresh_kernel():
    """A Triton kernel no process has built: its source holds a constant seen nowhere else."""
    import importlib.util
    import sys
    import tempfile
    import uuid

    tag = uuid.uuid4().int % 10**9
    path = Path(tempfile.mkdtemp()) / f"fresh_{tag}.py"
    path.write_text(f"""import triton
import triton.language as tl


@triton.jit
def add(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + {tag}, mask=offs < n)
""")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module.add


def test_triton_compiles_within_a_step_are_counted():
    """The runtime hooks bracket a compilation: a step that built a kernel says for how long, the next one (the
    kernel cached) says nothing. On the CPU the hooks are driven as Triton drives them around a build."""
    triton = pytest.importorskip("triton")
    pauses = HostPauses(torch.device("cpu"))
    mark = pauses.mark()
    if torch.cuda.is_available():
        kernel, x = _fresh_kernel(), torch.zeros(8, device="cuda")
        kernel[(1,)](x, 8, BLOCK=8)
        assert x[0].item() > 0
    else:
        hooks = triton.knobs.runtime
        assert hooks.jit_cache_hook(key="k", repr="", fn=None, compile={}, is_manual_warmup=False,
                                    already_compiled=False) is None  # None: Triton goes on and compiles
        time.sleep(0.05)
        hooks.jit_post_compile_hook(key="k", repr="", fn=None, compile={}, is_manual_warmup=False,
                                    already_compiled=False)
    gc_s, compile_s, _ = pauses.take(mark, 1.0)
    assert compile_s >= 0.01
    if torch.cuda.is_available():
        mark = pauses.mark()
        kernel[(1,)](x, 8, BLOCK=8)
        assert pauses.take(mark, 1.0)[1] == 0


def test_a_step_record_keeps_its_pauses_through_the_log():
    from valora.orchestrator.policy import StepRecord

    r = StepRecord("unmerged", None, 2, 2, 1.5, 0.0, gc_s=0.4, alloc_retries=3, capture_s=0.1, launch_s=0.2)
    back = StepRecord.from_json(r.to_json())
    assert (back.gc_s, back.alloc_retries, back.launch_s) == (0.4, 3, 0.2)
    assert back.compute_s == pytest.approx(1.4)  # a capture is no part of the step's own work


@pytest.mark.families("qwen2_vl")
def test_a_step_records_the_callers_time_while_it_was_in_flight(tiny_model):
    """What the engine's caller does between two `step` calls (the core loop receives requests and sends outputs)
    runs while a step is in flight: that step's record says how long."""
    import time

    from valora import LLM, SamplingParams

    llm = LLM(str(tiny_model), dtype="float32", device="cpu", scheduler="slora", enable_lora=True, max_loras=2,
              max_lora_rank=8)
    engine, records = llm.engine, []
    observe = engine.core.policy.observe
    engine.core.policy.observe = lambda r: records.append(r) or observe(r)
    engine.add_request("a", "a prompt of a few words", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    engine.step()
    time.sleep(0.2)  # the caller busy elsewhere, a step in flight
    while engine.has_unfinished_requests():
        engine.step()
    assert max(r.outside_s for r in records) >= 0.2 and min(r.outside_s for r in records) < 0.1
    assert all(0 < r.launch_s < r.duration_s + 0.1 for r in records)
