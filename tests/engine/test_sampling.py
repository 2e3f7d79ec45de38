"""Per-request sampling: seeds reproduce, stop strings and stop tokens end a completion, n completions, limits."""

from __future__ import annotations

import pytest
import torch

from valora import LLM, SamplingParams
from valora.engine.sampler import _filter_rows, sample
from valora.engine.sequence import Sequence
from valora.multimodal.inputs import InputError, ProcessedPrompt
from valora.testing.families import FAMILIES

pytestmark = pytest.mark.families("qwen2_vl")  # sampling is the same for every family; chat templates are not


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(str(tiny_model), dtype="float32", device="cpu", seed=0)


def _tokens(llm, prompt, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0].outputs


def test_seeded_sampling_reproduces_and_differs_by_seed(llm):
    a = _tokens(llm, "a dog runs", temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)[0].token_ids
    b = _tokens(llm, "a dog runs", temperature=1.0, seed=1, max_tokens=16, ignore_eos=True)[0].token_ids
    c = _tokens(llm, "a dog runs", temperature=1.0, seed=2, max_tokens=16, ignore_eos=True)[0].token_ids
    assert a == b and a != c


def test_seed_is_independent_of_batch_company(llm):
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    alone = llm.generate("the quick brown fox", params, use_tqdm=False)[0].outputs[0].token_ids
    crowd = llm.generate(["hello", "the quick brown fox", "world"],
                         [SamplingParams(temperature=1.0, max_tokens=12), params, SamplingParams(temperature=0)],
                         use_tqdm=False)
    assert crowd[1].outputs[0].token_ids == alone


def test_top_k_one_is_greedy(llm):
    greedy = _tokens(llm, "hello world", temperature=0, max_tokens=10, ignore_eos=True)[0].token_ids
    topk1 = _tokens(llm, "hello world", temperature=1.3, top_k=1, seed=3, max_tokens=10, ignore_eos=True)[0]
    assert topk1.token_ids == greedy


def test_n_completions(llm):
    outs = _tokens(llm, "caption :", n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    assert [o.index for o in outs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in outs}) > 1


def test_stop_string_truncates_text(llm):
    full = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True)[0]
    stop = full.text[4:7]
    assert stop.strip(), full.text
    out = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True, stop=[stop])[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.find(stop)]
    # the step pipeline finds a stop string one step late: the token sampled meanwhile must not be kept
    tok = llm.get_tokenizer()
    text_of = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    ends = next(k for k in range(1, len(full.token_ids) + 1) if stop in text_of(full.token_ids[:k]))
    assert out.token_ids == full.token_ids[:ends]
    kept = _tokens(llm, "the answer is", temperature=0, max_tokens=20, ignore_eos=True, stop=[stop],
                   include_stop_str_in_output=True)[0]
    assert kept.text == full.text[: full.text.find(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(llm):
    full = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids
    target = full[3]
    first = full.index(target)
    out = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[target])[0]
    assert out.token_ids == full[: first + 1] and out.finish_reason == "stop" and out.stop_reason == target
    held = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[target],
                   min_tokens=first + 2)[0]
    assert len(held.token_ids) >= first + 2 and held.token_ids[first] != target


def test_eos_stops_unless_ignored(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu")
    full = _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids
    # a random model never says EOS by itself: declare one it will say
    llm.engine.input_processor.eos_token_ids = frozenset({full[2]})
    out = _tokens(llm, "a red car", temperature=0, max_tokens=12)[0]
    assert out.finish_reason == "stop" and out.stop_reason is None
    assert out.token_ids == full[: full.index(full[2]) + 1]
    assert _tokens(llm, "a red car", temperature=0, max_tokens=12, ignore_eos=True)[0].token_ids == full


def test_max_model_len_caps_generation(tiny_model):
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", max_model_len=24)
    out = llm.generate("a dog runs across green grass", SamplingParams(temperature=0, max_tokens=100,
                       ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 24


@pytest.mark.families(*FAMILIES)
def test_chat_applies_template_with_images(llm, family):
    """The family's own template (LLaVA's ships beside the processor, in chat_template.json)."""
    from valora.testing.images import random_image

    messages = [{"role": "user", "content": [{"type": "image", "image": random_image(56, 56)},
                                              {"type": "text", "text": "what digit is shown ?"}]}]
    prompt = llm.chat_prompt(messages)
    assert prompt["prompt"].count(family.image_token) == 1 and "what digit is shown ?" in prompt["prompt"]
    out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    direct = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


# --- the batched sampler itself, on synthetic logits (no model): one host transfer per step for any mix of rows


def _seq(params: SamplingParams, generated: int = 0):
    gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None  # as the engine does
    seq = Sequence(0, "r", 0, ProcessedPrompt([1, 2, 3]), params, None, 0.0, gen)
    seq.output_ids = [0] * generated
    return seq


def _old_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """The per-row filter the batched one replaced (the reference for `_filter_rows`)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def _mixed_batch(vocab: int = 64):
    """A batch with every kind of row; the seeded one (row 2) is the one followed across batches."""
    gen = torch.Generator().manual_seed(123)
    logits = torch.randn(7, vocab, generator=gen) * 2
    seqs = [
        _seq(SamplingParams(temperature=0)),
        _seq(SamplingParams(temperature=0.7, logprobs=3)),
        _seq(SamplingParams(temperature=1.0, seed=42)),
        _seq(SamplingParams(temperature=1.2, top_k=5, top_p=0.8, seed=7, logprobs=0)),
        _seq(SamplingParams(temperature=0, min_tokens=4, logprobs=2), generated=1),
        _seq(SamplingParams(temperature=0.9, top_p=0.5)),
        _seq(SamplingParams(temperature=1.5, top_k=3, min_tokens=2)),
    ]
    stops = [set(), set(), set(), set(), {int(logits[4].argmax())}, set(), {int(logits[6].argmax())}]
    return logits, seqs, stops


def test_greedy_is_argmax_ties_included():
    logits = torch.randn(6, 40)
    logits[1, 3] = logits[1, 17] = logits[1].max() + 1  # a tie: torch.argmax's pick
    tokens = sample(logits.clone(), [_seq(SamplingParams(temperature=0)) for _ in range(6)], [set()] * 6)
    assert tokens == logits.argmax(-1).tolist()
    mixed, seqs, stops = _mixed_batch()
    tokens = sample(mixed.clone(), seqs, stops)
    assert tokens[0] == int(mixed[0].argmax())  # a greedy row is not touched by its sampled neighbours


def test_filter_rows_matches_per_row_reference_and_leaves_other_rows():
    x = torch.randn(7, 50) * 3
    x[2, :3] = x[2].max() + 1  # ties at the top
    x[6, 10:14] = x[6].sort(descending=True).values[3] + 1e-3  # ties at the k-th value: all of them are kept
    cases = {0: (5, 1.0), 2: (12, 0.7), 6: (6, 1.0), 3: (50, 0.3), 5: (1, 0.9)}
    by_k = [r for r, (k, _) in cases.items() if k < 50]
    by_p = [r for r, (k, _) in cases.items() if k == 50]
    out = x.clone()
    _filter_rows(out, [(torch.tensor(by_k), torch.tensor([cases[r][0] for r in by_k]),
                        torch.tensor([cases[r][1] if cases[r][1] < 1 else 2.0 for r in by_k]), 12),
                       (torch.tensor(by_p), torch.tensor([50] * len(by_p)), torch.tensor([cases[r][1] for r in by_p]),
                        50)])
    for r, (k, p) in cases.items():
        assert torch.equal(out[r], _old_filter(x[r], k if k < 50 else 0, p)), r
    assert int(torch.isfinite(out[6]).sum()) == 7  # three above, four tied at the sixth value
    for r in (1, 4):
        assert torch.equal(out[r], x[r])


def test_seeded_row_same_alone_and_in_any_batch():
    logits, seqs, stops = _mixed_batch()
    row = logits[2:3]

    def steps(batch_logits, batch_seqs, batch_stops, at, n=6):
        batch_seqs[at].generator.manual_seed(42)
        return [sample(batch_logits.clone(), batch_seqs, batch_stops)[at] for _ in range(n)]

    alone = steps(row, [seqs[2]], [set()], 0)
    assert steps(logits, seqs, stops, 2) == alone
    flipped = list(range(6, -1, -1))
    assert steps(logits[flipped], [seqs[i] for i in flipped], [stops[i] for i in flipped], 4) == alone
    seqs[2].generator.manual_seed(43)
    assert [sample(row.clone(), [seqs[2]], [set()])[0] for _ in range(6)] != alone
    # an unseeded row is random
    free = [_seq(SamplingParams(temperature=1.0))]
    assert len({tuple(sample(row.clone(), free, [set()])) for _ in range(8)}) > 1


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(8, 100) * 2
    seqs = [_seq(SamplingParams(temperature=1.5, top_k=1, seed=i)) for i in range(4)]
    seqs += [_seq(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(4)]
    for _ in range(3):
        assert sample(logits.clone(), seqs, [set()] * 8) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([3.0, 2.5, 2.2, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0])
    n = 3000
    by_k = sample(logits.repeat(n, 1), [_seq(SamplingParams(temperature=1.0, top_k=4))] * n, [set()] * n)
    assert set(by_k) == {0, 1, 2, 3}
    probs = logits.softmax(-1)
    need = int((probs.cumsum(-1) < 0.8).sum()) + 1  # smallest prefix with mass >= 0.8
    by_p = sample(logits.repeat(n, 1), [_seq(SamplingParams(temperature=1.0, top_p=0.8))] * n, [set()] * n)
    assert set(by_p) == set(range(need))
    free = sample(logits.repeat(n, 1), [_seq(SamplingParams(temperature=1.0))] * n, [set()] * n)
    assert set(free) > set(by_k)  # rows without top_k / top_p keep the whole vocabulary


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_frequencies_follow_softmax_over_temperature(temperature, seeded):
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 2000 if seeded else 20000
    seqs = [_seq(SamplingParams(temperature=temperature, seed=i if seeded else None)) for i in range(n)]
    counts = torch.bincount(torch.tensor(sample(logits.repeat(n, 1), seqs, [set()] * n)), minlength=6).double()
    expected = (logits / temperature).softmax(-1).double() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5, (counts.tolist(), expected.tolist())  # 5 degrees of freedom, p = 0.001


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.zeros(4, 20)
    logits[:, 7] = 10.0
    logits[:, 3] = 5.0
    original = logits.clone()
    seqs = [_seq(SamplingParams(temperature=0, min_tokens=3), generated=2),
            _seq(SamplingParams(temperature=0, min_tokens=3), generated=3),
            _seq(SamplingParams(temperature=1.0, min_tokens=3, seed=1), generated=0),
            _seq(SamplingParams(temperature=0))]
    stops = [{7, 99}, {7}, {7, 3}, {7}]  # 99: out of the vocabulary, ignored
    for _ in range(20):
        tokens = sample(logits, seqs, stops)
        assert tokens[0] == 3 and tokens[1] == 7 and tokens[2] not in (3, 7) and tokens[3] == 7
    assert torch.equal(logits, original)  # the caller's logits are never modified


def test_logprobs_are_the_models_log_softmax():
    logits, seqs, stops = _mixed_batch()
    ref = logits.log_softmax(-1)
    for step in range(2):
        tokens = sample(logits.clone(), seqs, stops)
        for i, seq in enumerate(seqs):
            k = seq.params.logprobs
            if k is None:
                assert seq.logprobs is None
                continue
            entry = seq.logprobs[step]
            top = torch.topk(ref[i], k).indices.tolist()
            assert list(entry)[:k] == top and tokens[i] in entry
            assert set(entry) == set(top) | {tokens[i]}
            for token, value in entry.items():
                assert value == float(ref[i, token])  # unmasked, untempered: the model's own distribution
        assert len(seqs[1].logprobs) == step + 1


def _penalized_reference(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams) -> torch.Tensor:
    """vLLM's penalties, one row at a time, from the token lists."""
    x = logits.clone()
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=x.shape[0]).float()
    seen = counts > 0
    seen[torch.tensor(prompt)] = True
    x = torch.where(seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
    return x - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def test_penalties_follow_vllm_over_many_steps():
    vocab = 24
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0, repetition_penalty=1.7),
              SamplingParams(temperature=0, frequency_penalty=0.6, presence_penalty=-0.3, logprobs=1),
              SamplingParams(temperature=0, repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1),
              SamplingParams(temperature=0.8, seed=3)]
    plain, _, with_logprobs, _, _ = seqs = [_seq(p) for p in params]
    seqs[3].prompt = ProcessedPrompt([5, 6, 7, 5])
    gen = torch.Generator().manual_seed(0)
    changed = 0
    for step in range(16):
        if step == 8:  # rows move between steps (others finish, preemption): the counts follow the sequence
            seqs = [seqs[i] for i in (3, 0, 4, 2, 1)]
        logits = torch.randn(len(seqs), vocab, generator=gen)
        logits[:, :4] += 1.5  # a few favourites, so that outputs repeat and the penalties bite
        tokens = sample(logits, seqs, [set()] * len(seqs))
        for i, seq in enumerate(seqs):
            if seq.params.greedy:
                ref = _penalized_reference(logits[i], seq.prompt.token_ids, seq.output_ids, seq.params)
                assert tokens[i] == int(ref.argmax()), (step, i)
                changed += tokens[i] != int(logits[i].argmax())
            if seq is with_logprobs:  # logprobs stay the model's own
                assert seq.logprobs[-1][tokens[i]] == pytest.approx(float(logits[i].log_softmax(-1)[tokens[i]]))
        for seq, t in zip(seqs, tokens):
            seq.output_ids.append(t)
    assert changed > 5
    assert plain.penalty_counts is None  # unpenalised rows keep no state


def test_logit_bias_is_added_to_the_listed_logits_before_sampling():
    vocab = 24
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, vocab, generator=gen)
    params = [SamplingParams(temperature=0, logit_bias={3: 100, 4: 5.5}),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0, logprobs=1, logit_bias={int(logits[2].argmax()): -100}),
              SamplingParams(temperature=0, logit_bias={vocab + 7: 100})]  # past these logits: ignored
    seqs = [_seq(p) for p in params]
    tokens = sample(logits, seqs, [set()] * 4)
    biased = logits.clone()
    biased[0, 3] += 100
    biased[0, 4] += 5.5
    biased[2, logits[2].argmax()] -= 100
    assert tokens == [3, int(logits[1].argmax()), int(biased[2].argmax()), int(logits[3].argmax())]
    assert tokens[2] != int(logits[2].argmax())
    assert seqs[2].logprobs[-1][tokens[2]] == pytest.approx(float(logits[2].log_softmax(-1)[tokens[2]]))  # the model's


def test_logit_bias_offline_and_its_refusals(llm):
    favourite = 17
    out = _tokens(llm, "Hello", max_tokens=6, ignore_eos=True, logit_bias={favourite: 100})[0]
    assert set(out.token_ids) == {favourite}
    with pytest.raises(ValueError, match=r"logit_bias values must be in \[-100, 100\]"):
        SamplingParams(logit_bias={5: 101})
    with pytest.raises(ValueError, match="logit_bias keys must be non-negative token ids"):
        SamplingParams(logit_bias={"5": 1.0})
    with pytest.raises(InputError, match="outside the vocabulary"):
        llm.generate(["Hello"], SamplingParams(logit_bias={10**6: 1.0}))


def test_penalised_seeded_row_same_alone_and_in_a_batch():
    def run(batch: bool) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=9, frequency_penalty=1.5)
        seq = _seq(p)
        others = [_seq(SamplingParams(temperature=0.5, repetition_penalty=1.3)), _seq(SamplingParams())]
        gen = torch.Generator().manual_seed(1)
        for _ in range(10):
            logits = torch.randn(3, 16, generator=gen)
            rows = [others[0], seq, others[1]] if batch else [seq]
            token = sample(logits if batch else logits[1:2], rows, [set()] * len(rows))[1 if batch else 0]
            for s in rows:
                s.output_ids.append(token if s is seq else 0)
        return seq.output_ids

    assert run(True) == run(False)


_SYNCS = ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("kind", ["mixed", "greedy", "sampled", "penalised"])
def test_one_device_to_host_transfer_per_step(monkeypatch, kind):
    logits, seqs, stops = _mixed_batch()
    if kind == "greedy":
        seqs = [_seq(SamplingParams(temperature=0)) for _ in seqs]
    elif kind == "sampled":
        seqs = [_seq(SamplingParams(temperature=0.8, top_k=10)) for _ in seqs]
    elif kind == "penalised":
        seqs = [_seq(SamplingParams(temperature=0.8 * (i % 2), repetition_penalty=1.2, presence_penalty=0.5),
                     generated=i) for i in range(len(seqs))]
    calls: list[str] = []
    for name in _SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _name=name, _original=original, **kw):
            calls.append(_name)
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    tokens = sample(logits, seqs, stops)
    monkeypatch.undo()
    assert calls == ["tolist"] and len(tokens) == len(seqs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_one_synchronisation_per_step_on_cuda():
    import warnings

    logits, seqs, stops = _mixed_batch()
    for s in seqs:
        if s.generator is not None:
            s.generator = torch.Generator(device="cuda").manual_seed(1)
    logits = logits.cuda()
    sample(logits, seqs, stops)  # warm up (pinned-memory pool, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sample(logits, seqs, stops)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # the tokens come back through pinned memory and an event: at most one synchronising call, never one per row
    assert len([w for w in caught if "synchroniz" in str(w.message)]) <= 1
