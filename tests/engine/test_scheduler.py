"""Scheduling rules: decodes first, FCFS admission within budget, blocks and adapter slots, LIFO preemption."""

from __future__ import annotations

from valora.config import SchedulerConfig
from valora.engine.block_manager import BlockManager
from valora.engine.scheduler import Scheduler
from valora.engine.sequence import Sequence, SequenceStatus
from valora.multimodal.inputs import ProcessedPrompt
from valora.sampling_params import SamplingParams


def _seq(i: int, n: int, lora: str | None = None) -> Sequence:
    return Sequence(i, f"r{i}", 0, ProcessedPrompt(list(range(n))), SamplingParams(), lora, float(i))


def _step(sched: Scheduler):
    out = sched.schedule()
    for s, n in zip(out.seqs, out.num_tokens):  # what the engine does after the model ran
        s.num_computed += n
        sched.blocks.cache_blocks(s)
        if s.num_computed == len(s):
            s.output_ids.append(1)
    return out


def test_admits_fcfs_within_blocks_and_budget():
    sched = Scheduler(SchedulerConfig(max_num_seqs=8), BlockManager(4, 4), max_batched_tokens=100, max_loras=None)
    for i, n in enumerate([5, 6, 3]):
        sched.add(_seq(i, n))
    out = _step(sched)  # 5 tokens -> 2 blocks, 6 -> 2 blocks, then no blocks left for the third
    assert [s.seq_id for s in out.seqs] == [0, 1]
    assert [s.seq_id for s in sched.waiting] == [2]


def test_adapter_slots_skip_but_keep_scanning():
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 4), max_batched_tokens=100, max_loras=2)
    for i, lora in enumerate(["a", "b", "c", None, "a", "c"]):
        sched.add(_seq(i, 3, lora))
    out = _step(sched)
    assert [s.seq_id for s in out.seqs] == [0, 1, 3, 4]  # c needs a third slot: skipped, later ones still admitted
    assert [s.seq_id for s in sched.waiting] == [2, 5]  # and they keep their place in line


def test_preempts_newest_when_blocks_run_out_and_recomputes():
    blocks = BlockManager(3, 4)
    sched = Scheduler(SchedulerConfig(), blocks, max_batched_tokens=100, max_loras=None)
    a, b = _seq(0, 4), _seq(1, 4)
    sched.add(a)
    sched.add(b)
    _step(sched)  # both admitted: 2 blocks used; each now holds 5 tokens and needs a second block
    out = _step(sched)
    assert out.preempted == [b] and out.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_computed == 0
    assert sched.waiting[0] is b
    while a in sched.running and len(a) < 12:
        _step(sched)
    sched.remove(a)
    out = sched.schedule()
    assert out.seqs == [b] and out.num_tokens == [5]  # prompt and output, in one prefill


def test_budget_limits_prefill_tokens():
    sched = Scheduler(SchedulerConfig(enable_chunked_prefill=False), BlockManager(64, 4), max_batched_tokens=10,
                      max_loras=None)
    for i in range(3):
        sched.add(_seq(i, 4))
    assert [s.seq_id for s in _step(sched).seqs] == [0, 1]  # whole prompts only: the third waits


def test_chunked_prefill_runs_decodes_first_and_splits_prompts_to_the_budget():
    sched = Scheduler(SchedulerConfig(), BlockManager(64, 4), max_batched_tokens=8, max_loras=None)
    streams = [_seq(i, 2) for i in range(3)]
    for s in streams:
        sched.add(s)
    _step(sched)  # the three short prompts, whole
    long_a, long_b = _seq(3, 20), _seq(4, 20)
    sched.add(long_a)
    sched.add(long_b)
    chunks = []
    while not long_b.output_ids:
        out = _step(sched)
        assert out.seqs[:3] == streams and out.num_tokens[:3] == [1, 1, 1]  # every stream decodes every step
        assert sum(out.num_tokens) <= 8
        chunks.append(list(zip([s.seq_id for s in out.seqs[3:]], out.num_tokens[3:])))
    # what the streams leave (5 tokens) goes to the older prompt first; once it decodes, the other gets 4 a step
    assert chunks == [[(3, 5)]] * 4 + [[(3, 1), (4, 4)]] * 5


def test_a_prompt_in_progress_may_preempt_a_newer_decode_already_in_the_step():
    blocks = BlockManager(4, 4)
    sched = Scheduler(SchedulerConfig(), blocks, max_batched_tokens=8, max_loras=None)
    prompt, stream = _seq(0, 20, lora="slow"), _seq(1, 2)
    sched.add(prompt)
    _step(sched)  # 8 of its 20 tokens: 2 blocks
    sched.add(stream)
    out = sched.schedule(ready=lambda s: s.lora_name != "slow")  # its adapter is reloading: the stream goes ahead
    assert out.seqs == [stream]
    stream.num_computed, stream.output_ids = 2, [1]
    out = sched.schedule()  # the stream decodes first, then the prompt needs 2 blocks where 1 is free
    assert out.seqs == [prompt] and out.num_tokens == [7] and out.preempted == [stream]
    assert stream.block_table == [] and sched.waiting[0] is stream and len(prompt.block_table) == 4


def test_prompts_per_step_capped_where_the_graphs_need_it():
    """With `max_prompt_seqs` (the token-bucket graphs' limit, set by the engine when it captures them) a step that
    decodes takes at most that many sequences with prompt work, in progress or new; decodes are never held back,
    and a step without decodes (no stream to stall) takes every prompt that fits."""
    def scheduler(budget: int, cap: int) -> Scheduler:
        return Scheduler(SchedulerConfig(), BlockManager(64, 4), max_batched_tokens=budget, max_loras=None,
                         max_prompt_seqs=cap)

    def steps(sched: Scheduler, n: int) -> list[list[tuple[int, int]]]:
        return [[(s.seq_id, k) for s, k in zip(out.seqs, out.num_tokens)] for out in (_step(sched) for _ in range(n))]

    sched = scheduler(64, 2)
    for i in range(5):
        sched.add(_seq(10 + i, 4))
    assert steps(sched, 1) == [[(10 + i, 4) for i in range(5)]]  # nothing decodes yet: all of them
    sched = scheduler(64, 2)
    sched.add(_seq(0, 1))  # a one-token prompt: decoding from its second step
    _step(sched)
    for i in range(5):
        sched.add(_seq(10 + i, 4))
    assert steps(sched, 3) == [[(0, 1), (10, 4), (11, 4)], [(0, 1), (10, 1), (11, 1), (12, 4), (13, 4)],
                               [(0, 1), (10, 1), (11, 1), (12, 1), (13, 1), (14, 4)]]
    # Chunked to the budget, a prompt in progress counts too: with a cap of one, the next prompt waits for it to
    # finish though the budget has room.
    sched = scheduler(21, 1)
    sched.add(_seq(0, 1))
    _step(sched)
    for i in range(2):
        sched.add(_seq(20 + i, 30))
    assert steps(sched, 3) == [[(0, 1), (20, 20)], [(0, 1), (20, 10)], [(0, 1), (20, 1), (21, 19)]]


def test_a_preempted_decode_gives_back_its_adapter_slot_within_the_step():
    """A decode preempted for an older prompt leaves the step: its adapter's slot is free for the prompts after it
    in the same step (here Q, whose adapter would be a third)."""
    sched = Scheduler(SchedulerConfig(), BlockManager(9, 4), max_batched_tokens=16, max_loras=2)
    p, q, s = _seq(0, 24, lora="p"), _seq(1, 12, lora="q"), _seq(2, 3, lora="s")

    def run_alone(seq, budget: int) -> None:
        sched.add(seq)
        sched.max_batched_tokens = budget
        out = sched.schedule(ready=lambda x: x is seq)
        assert out.seqs == [seq]
        seq.num_computed += out.num_tokens[0]

    run_alone(p, 16)  # 16 of 24 tokens: 4 blocks
    run_alone(q, 10)  # 10 of 12: 3 blocks, its last 2 tokens fit in them
    run_alone(s, 16)  # its whole prompt: 1 block, now decoding
    s.output_ids.append(1)
    sched.max_batched_tokens = 16
    out = sched.schedule()  # s decodes first; p's last 8 tokens need 2 blocks where 1 is free: s is preempted
    assert out.preempted == [s]
    assert out.seqs == [p, q] and out.num_tokens == [8, 2]
