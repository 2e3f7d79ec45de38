"""The `valora` policy's step-cost model (issue 19): it converges to the device's real costs from the engine's own
steps, a recorded table seeds it, and the policy built on it merges exactly where merging pays on that device.

Ground truths here are linear in the model's features with multiplicative noise; their numbers are of the H100's
order (a decode step of a 7B model about 10 ms, one LoRA pass about 1.6 ms of launches inside a CUDA graph)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from valora.orchestrator.cost_model import FEATURES, CostTable, DeviceRates, StepCostModel, StepWork
from valora.orchestrator.modes import step_mode
from valora.orchestrator.policy import SchedulerView, StepRecord
from valora.orchestrator.valora_policy import ValoraPolicy

NAMES = [f for f, _ in FEATURES]
MB = 1 << 20
SIZES = {f"a{i}": (160, 80, 40, 20)[i % 4] * MB for i in range(16)}  # ranks 64/32/16/8 of a 7B model, all linears
GPU = DeviceRates(bandwidth=3e12, flops=8e14, launch_s=1e-3)
WEIGHT_BYTES = 15 << 30


def truth(**coef: float) -> np.ndarray:
    base = dict(step=8e-3, tokens=2e-5, seqs=3e-5, attention_m=1.5e-3, image_tokens=2e-4, lora_passes=1.6e-3,
                lora_adapters=5e-5, lora_gb=1.2e-3, lora_token_gb=2.5e-6, slot_load_gb=0.04)
    base.update(coef)
    return np.array([base[n] for n in NAMES])


def random_step(rng: np.random.Generator) -> StepWork:
    """Decode or prefill, base or adapters, unmerged, merged or mixture, some with images and slot loads."""
    names = list(SIZES)
    seqs = int(rng.integers(1, 65))
    decode = rng.random() < 0.7
    k = int(rng.integers(1, 9))
    chosen = list(rng.choice(names, size=k, replace=False))
    pick = rng.choice(len(chosen) + 1, size=seqs)
    tokens: dict[str | None, int] = {}
    attention = 0
    for j in pick:
        a = chosen[j] if j < len(chosen) else None
        n = 1 if decode else int(rng.integers(16, 600))
        tokens[a] = tokens.get(a, 0) + n
        attention += n * (int(rng.integers(50, 2000)) if decode else n)
    hot = None if rng.random() < 0.5 else chosen[0]
    if hot is not None and rng.random() < 0.3:
        tokens = {hot: sum(tokens.values())}  # merged: all the hot adapter's
    images = 0 if decode or rng.random() < 0.5 else 256 * int(rng.integers(1, 4))
    loads = int(SIZES[chosen[-1]]) if rng.random() < 0.1 else 0
    return StepWork(tokens, seqs, hot, SIZES, images, loads, attention)


def measure(work: StepWork, theta: np.ndarray, rng: np.random.Generator, noise: float = 0.05) -> float:
    return float(work.features() @ theta) * float(np.exp(rng.normal(0.0, noise)))


def test_model_converges_to_a_synthetic_ground_truth():
    rng = np.random.default_rng(0)
    theta = truth()
    model = StepCostModel(CostTable.analytic(GPU, WEIGHT_BYTES), window=2048)
    first = [random_step(rng) for _ in range(50)]
    before = np.median([abs(model.predict("graph", w) / (w.features() @ theta) - 1) for w in first])
    for _ in range(1500):
        w = random_step(rng)
        model.observe("graph", w, measure(w, theta, rng))
    held_out = [random_step(rng) for _ in range(500)]
    predicted = np.array([model.predict("graph", w) for w in held_out])
    true = np.array([w.features() @ theta for w in held_out])
    errors = np.abs(predicted / true - 1)
    assert before > 0.3  # the seed priced from rates alone is far off
    assert np.median(errors) < 0.02 and np.percentile(errors, 95) < 0.06, (np.median(errors), errors.max())
    learned = model.coefficients("graph")
    for name in ("step", "tokens", "lora_passes", "image_tokens", "slot_load_gb"):  # the costs that matter most
        assert learned[name] == pytest.approx(theta[NAMES.index(name)], rel=0.15), name


def test_noise_does_not_bias_the_prediction_low():
    """Step times on a busy host are noisy and skewed; weights from predictions keep the mean unbiased (weights
    from the measurement itself would favour fast outliers and predict low)."""
    rng = np.random.default_rng(1)
    theta = truth()
    model = StepCostModel(CostTable.analytic(GPU, WEIGHT_BYTES))
    work = StepWork({"a0": 16, "a1": 16}, 32, None, SIZES, attention=32 * 500)
    measured = []
    for _ in range(2000):
        seconds = measure(work, theta, rng, noise=0.3)
        measured.append(seconds)
        model.observe("graph", work, seconds)
    assert model.predict("graph", work) == pytest.approx(np.mean(measured), rel=0.05)


def test_a_recorded_table_seeds_the_same_model(tmp_path):
    """`valora bench costs --fit` writes what a run's steps said; a model seeded by it predicts as the run's own
    fit did, before it has seen a step."""
    rng = np.random.default_rng(2)
    theta = truth()
    recorder = StepCostModel(CostTable.analytic(GPU, WEIGHT_BYTES))
    for _ in range(1000):
        w = random_step(rng)
        recorder.observe("graph", w, measure(w, theta, rng))
        w = random_step(rng)
        recorder.observe("eager", w, measure(w, 1.5 * theta, rng))
    path = CostTable.path_for("Some GPU 80GB", tmp_path)
    path.write_text(json.dumps(recorder.table("Some GPU 80GB", {"commit": "test"})))
    table = CostTable.for_device("Some GPU 80GB", tmp_path)
    assert table.device == "Some GPU 80GB" and set(table.paths) == {"graph", "eager"} and table.weight == 256
    seeded = StepCostModel(table)
    for w in (random_step(rng) for _ in range(100)):
        for path_name, scale in (("graph", 1.0), ("eager", 1.5)):
            assert seeded.predict(path_name, w) == pytest.approx(scale * w.features() @ theta, rel=0.08)


@dataclass(eq=False)
class Seq:
    seq_id: int
    lora_name: str | None
    arrival_time: float = 0.0
    deadline: float | None = None
    num_computed: int = 99
    length: int = 100

    def __len__(self) -> int:
        return self.length


def decode_view(adapters: list[str | None], hot: str | None = None, held: str | None = None) -> SchedulerView:
    return SchedulerView(waiting=[], running=[Seq(i, a) for i, a in enumerate(adapters)], hot=hot, now=0.0,
                         max_num_seqs=64, max_batched_tokens=4096, adapter_bytes=SIZES.__getitem__,
                         merge_bytes=lambda name: 13 << 30, held=held)


def run_decode(policy: ValoraPolicy, adapters: list[str | None], theta: np.ndarray, steps: int,
               rng: np.random.Generator, hot: str | None = None) -> list[str | None]:
    """Decode steps of one batch under `policy`, its steps timed by the ground truth, from `hot` merged; the hot
    adapter of each. As in the engine, the shadow weights keep the last merged adapter, so merging it again (or
    unmerging) only flips pointers and is free; merging another one costs a switch."""
    hots, held = [], hot
    for _ in range(steps):
        decision = policy.decide(decode_view(adapters, hot, held))
        switch = 0.011 if decision.hot not in (None, hot, held) else 0.0
        hot = decision.hot
        held = hot if hot is not None else held
        tokens: dict[str | None, int] = {}
        for a in adapters:
            tokens[a] = tokens.get(a, 0) + 1
        work = StepWork(tokens, len(adapters), hot, SIZES, attention=len(adapters) * 100)
        mode = step_mode(hot, adapters).value
        policy.observe(StepRecord(mode, hot, len(adapters), len(adapters), measure(work, theta, rng) + switch, switch,
                                  (13 << 30) if switch else 0, work, graph=True, decode=True))
        hots.append(hot)
    return hots


def recorded_policy(theta: np.ndarray, tmp_path, rng: np.random.Generator, **options: float) -> ValoraPolicy:
    """A policy seeded by a table recorded from steps of every mode on a device whose costs are `theta`."""
    recorder = StepCostModel(CostTable.analytic(GPU, WEIGHT_BYTES))
    for _ in range(1500):
        w = random_step(rng)
        recorder.observe("graph", w, measure(w, theta, rng))
    tmp_path.mkdir(exist_ok=True)
    path = CostTable.path_for("GPU", tmp_path)
    path.write_text(json.dumps(recorder.table("GPU")))
    return ValoraPolicy(rates=GPU, costs=StepCostModel(CostTable.for_device("GPU", tmp_path)), **options)


def test_merges_for_a_hot_adapter_and_not_for_a_uniform_mix(tmp_path):
    rng = np.random.default_rng(3)
    theta = truth()
    policy = recorded_policy(theta, tmp_path, rng)
    hot = policy.decide(decode_view(["a0"] * 32))
    assert hot.hot == "a0" and hot.costs["a0"] < hot.costs[None]  # one adapter: merged, no LoRA pass at all
    uniform = policy.decide(decode_view([f"a{i % 16}" for i in range(32)]))
    assert uniform.hot is None  # a mixture would add a pass and save nearly nothing
    # Prefill of long prompts, most of one adapter: the mixture saves that adapter's token work where that work
    # costs something (priced without exploring: the two differ by 1% of the step, which is worth a try).
    prefill = SchedulerView(waiting=[Seq(i, "a0" if i < 6 else "a5", num_computed=0, length=2000) for i in range(7)],
                            running=[], hot=None, now=0.0, max_num_seqs=64, max_batched_tokens=16384,
                            adapter_bytes=SIZES.__getitem__, merge_bytes=lambda name: 13 << 30)
    cheap_tokens = recorded_policy(truth(lora_token_gb=0.0), tmp_path / "cheap", rng, explore=0.0)
    costly_tokens = recorded_policy(truth(lora_token_gb=2e-3), tmp_path / "costly", rng, explore=0.0)
    assert cheap_tokens.decide(prefill).hot is None and costly_tokens.decide(prefill).hot == "a0"
    # Steady decode under each: the hot batch stays merged, the uniform one never merges.
    assert run_decode(policy, ["a0"] * 32, theta, 50, rng)[-40:] == ["a0"] * 40
    assert set(run_decode(policy, [f"a{i % 16}" for i in range(32)], theta, 50, rng)) == {None}


def test_tries_merging_where_the_seed_is_unsure_and_keeps_it_where_it_pays():
    """Seeded by rates that overprice the base model and make a LoRA pass look free, the policy puts an unmerged
    step's whole time on the base model and has no reason to merge; but the steps it runs say nothing about a
    merged step, so it tries one, measures it, and stays merged because it pays."""
    rng = np.random.default_rng(4)
    theta = truth(lora_passes=4e-3)  # a device whose LoRA launches are expensive
    blind = DeviceRates(bandwidth=1e12, flops=8e14, launch_s=1e-6)
    batch = ["a0"] * 32
    no_exploring = ValoraPolicy(rates=blind, costs=StepCostModel(CostTable.analytic(blind, WEIGHT_BYTES)),
                                explore=0.0)
    assert run_decode(no_exploring, batch, theta, 100, rng).count("a0") == 0
    policy = ValoraPolicy(rates=blind, costs=StepCostModel(CostTable.analytic(blind, WEIGHT_BYTES)))
    hots = run_decode(policy, batch, theta, 100, rng)
    assert hots[-50:] == ["a0"] * 50, hots


def test_stops_a_mixture_that_does_not_pay():
    """Seeded by rates that make token work expensive and passes free, a mixture looks worth it for a batch that
    is mostly one adapter; this device's steps say a second pass costs more than it saves, and the policy stops."""
    rng = np.random.default_rng(5)
    theta = truth()
    keen = DeviceRates(bandwidth=3e12, flops=1e10, launch_s=1e-6)
    policy = ValoraPolicy(rates=keen, costs=StepCostModel(CostTable.analytic(keen, WEIGHT_BYTES)))
    batch = ["a0"] * 28 + ["a1", "a2", "a3", "a4"]
    hots = run_decode(policy, batch, theta, 200, rng, hot="a0")  # in mixture mode when the others arrived
    assert hots[0] == "a0" and hots[-100:] == [None] * 100, hots


def test_does_not_flip_between_modes_priced_alike():
    """Where a LoRA pass costs nothing, unmerged and mixture steps take the same time, and going back and forth is
    free (the shadow weights keep the adapter). Each mode's measurements narrow its own deviation and so hand the
    other the optimistic bound: without hysteresis the policy flips every step (as the H100's step log showed at
    8 req/s, 3,686 flips in 45 s); with it, it settles."""
    theta = truth(lora_passes=0.0, lora_adapters=0.0, lora_gb=0.0, lora_token_gb=0.0)
    batch = ["a0"] * 3 + ["a1"]

    def flips(**options: float) -> int:
        rng = np.random.default_rng(8)
        policy = ValoraPolicy(rates=GPU, costs=StepCostModel(CostTable.analytic(GPU, WEIGHT_BYTES)), **options)
        hots = run_decode(policy, batch, theta, 400, rng)[200:]
        return sum(a != b for a, b in zip(hots, hots[1:]))

    assert flips(hysteresis=0.0) > 150
    assert flips() == 0  # the default


def test_prices_admissions_on_the_path_steps_with_prefill_work_took(tmp_path):
    """Steps that admit prompts replay token-bucket CUDA graphs where the engine has them: once such a step ran from a
    graph, admissions are priced by the graph fit, not the eager one (its steps three times dearer). (A horizon of
    one step: the price is this step's alone, not blended with the decodes after it.)"""
    rng = np.random.default_rng(6)
    policy = recorded_policy(truth(), tmp_path, rng, horizon_steps=1)
    for _ in range(300):
        w = random_step(rng)
        policy.observe(StepRecord("unmerged", None, w.seqs, 0, measure(w, 3 * truth(), rng), 0.0, 0, w))
    view = SchedulerView(waiting=[Seq(i, f"a{i}", num_computed=0, length=300) for i in range(4)],
                         running=[Seq(10 + i, f"a{i % 16}") for i in range(32)], hot=None, now=0.0, max_num_seqs=64,
                         max_batched_tokens=2048, adapter_bytes=SIZES.__getitem__, merge_bytes=lambda name: 13 << 30)
    eager = policy.decide(view).costs[None]
    w = random_step(rng)
    policy.observe(StepRecord("unmerged", None, w.seqs, 0, measure(w, truth(), rng), 0.0, 0, w, graph=True))
    assert policy.decide(view).costs[None] < 0.75 * eager


def test_does_not_merge_for_one_prefill_step_that_the_decodes_after_it_pay_for(tmp_path):
    """A prompt of one adapter arriving beside a mixed decode batch: a mixture saves that prompt's LoRA token work
    in the step that prefills it, and costs every decode after it a second pass. A mode holds for `horizon_steps`
    (the switch is spread over them), so the policy prices the prefill step and the decodes that follow, and does
    not merge; priced on the prefill step alone it would, and undo it at the next decode: on the H100, 600 switches
    in 45 s of VQA at 24 req/s."""
    rng = np.random.default_rng(9)
    theta = truth(lora_token_gb=2e-4)
    view = SchedulerView(waiting=[Seq(99, "a4", num_computed=0, length=400)],
                         running=[Seq(i, f"a{i % 16}") for i in range(63)], hot=None, now=0.0, max_num_seqs=64,
                         max_batched_tokens=512, adapter_bytes=SIZES.__getitem__, merge_bytes=lambda name: 1 << 30)
    one_step = recorded_policy(theta, tmp_path / "one", rng, explore=0.0, horizon_steps=1).decide(view)
    assert one_step.hot == "a4" and one_step.costs["a4"] < one_step.costs[None]
    decision = recorded_policy(theta, tmp_path / "eight", rng, explore=0.0).decide(view)
    assert decision.hot is None and decision.costs[None] < decision.costs["a4"]
    # The same prompt beside decodes that are all its adapter's: the mixture pays in the decodes too, and merges.
    alike = SchedulerView(waiting=view.waiting, running=[Seq(i, "a4") for i in range(63)], hot=None, now=0.0,
                          max_num_seqs=64, max_batched_tokens=512, adapter_bytes=SIZES.__getitem__,
                          merge_bytes=lambda name: 1 << 30)
    assert recorded_policy(theta, tmp_path / "alike", rng, explore=0.0).decide(alike).hot == "a4"
