"""Token selection for a whole batch on the logits' device: greedy, or temperature / top-k / top-p sampling with
optional per-request seeds, plus the model's own log-probabilities where asked.

Per step the per-row parameters go to the device in one host->device copy, everything runs as batched tensor ops
with no host synchronisation, and the tokens (with any log-probabilities) come back in one device->host copy.

Before sampling, per row as it asks: vLLM's penalties on the raw logits (repetition: logits of tokens in the prompt
or output divided by it when positive, multiplied when negative; frequency and presence: subtracted per
occurrence and once per generated token) from token counts kept on the device with the sequence and updated there
with each sampled token; then its `logit_bias` (added to the listed tokens' logits); then a structured-output
row's grammar bitmask (computed on the host from its matcher while the model runs, sent in one more copy). Rows
that ask for none of these cost nothing.

Sampling is an exponential race (the Gumbel-max trick): the token is `argmax(logits / T - log E)` with
`E ~ Exp(1)` drawn per vocabulary entry, which picks token i with probability `softmax(logits / T)[i]`. A row with a
seed draws its `E` from its own generator (`seq.generator`, V draws per step whatever else is in the batch), so its
stream does not depend on its company; unseeded rows share one draw from the device's default generator. Greedy
rows get `E = 1` (no noise), so they are the exact `argmax` of their (min_tokens-masked) logits.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq

import torch

from valora.engine.sequence import Sequence
from valora.engine.structured_outputs import apply_bitmasks, fill_bitmasks

_TINY = torch.finfo(torch.float32).tiny  # keeps log(E) finite, so a filtered (-inf) logit never turns into NaN


class _Pack:
    """Host-side segments sent to the device in one copy (float64: exact for token ids, flat indices and params)."""

    def __init__(self) -> None:
        self.values: list[float] = []
        self.spans: dict[str, tuple[int, int]] = {}

    def add(self, name: str, values: list) -> None:
        self.spans[name] = (len(self.values), len(self.values) + len(values))
        self.values.extend(values)

    def send(self, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.values:
            return {}
        cuda = device.type == "cuda"
        host = torch.tensor(self.values, dtype=torch.float64, pin_memory=cuda)
        dev = host.to(device, non_blocking=cuda)
        return {name: dev[a:b] for name, (a, b) in self.spans.items()}


def _cutoffs(vals: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor | None) -> torch.Tensor:
    """vals: [n, W] each row's W largest logits, descending. The smallest logit each row keeps: its top-k (ties at
    the k-th value kept), then the smallest prefix of those whose probability mass reaches its top-p."""
    cut = vals.gather(1, (top_k - 1).unsqueeze(1)).squeeze(1)
    if top_p is None:
        return cut
    vals = vals.masked_fill(vals < cut.unsqueeze(1), float("-inf"))
    probs = vals.softmax(-1)
    drop = (probs.cumsum(-1) - probs) > top_p.unsqueeze(1)
    return torch.maximum(cut, vals.masked_fill(drop, float("inf")).amin(-1))


def _filter_rows(x: torch.Tensor, groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]]) -> None:
    """In place: -inf every logit of x ([B, V], temperature applied) under its row's cutoff. Each group is (rows,
    top_k, top_p or None, width): rows with a top-k look at their `width` = max(top_k) best logits (`topk`), rows
    with only a top-p sort their whole row; a row without a top-k has top_k = width, without a top-p top_p = 2.
    Rows in no group are left as they are (their cutoff is -inf). A cutoff is a value: logits tied with it are all
    kept (the per-row sort this replaced kept an arbitrary subset of a tie at the top-p edge)."""
    thresh = torch.full((x.shape[0],), float("-inf"), dtype=x.dtype, device=x.device)
    for rows, top_k, top_p, width in groups:
        sub = x.index_select(0, rows)
        vals = sub.sort(-1, descending=True).values if width == x.shape[1] else sub.topk(width).values
        thresh.index_copy_(0, rows, _cutoffs(vals, top_k, top_p))
    x.masked_fill_(x < thresh.unsqueeze(1), float("-inf"))


def sample(logits: torch.Tensor, seqs: Seq[Sequence], stop_ids: Seq[set[int]]) -> list[int]:
    """logits: [B, V] float32, one row per sequence. `stop_ids[i]` are masked while min_tokens is not reached.
    Sequences that asked for logprobs get the model's own (unprocessed) distribution appended: its top-k and the
    chosen token, as {token_id: logprob}."""
    return sample_async(logits, seqs, stop_ids).result()


class PendingSample:
    """Tokens (and logprob values) on their way to the host: on a GPU the one copy is queued into pinned memory
    and `result()` waits for it alone, so the host can work while the step runs. `tokens` are the sampled ids on
    the device, one per row, which the next step may read as its input before they reach the host."""

    def __init__(self, packed: torch.Tensor | None, finish: Callable[[list], list[int]],
                 tokens: torch.Tensor | None = None) -> None:
        self.finish, self.event, self.tokens = finish, None, tokens
        self.packed = packed
        if packed is not None and packed.is_cuda:
            self.packed = _staging(packed)
            self.packed.copy_(packed, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def result(self) -> list[int]:
        if self.packed is None:
            return self.finish([])
        if self.event is not None:
            self.event.synchronize()
        return self.finish(self.packed.tolist())  # the one device->host copy (on a GPU: already done)


_STAGING: dict[torch.dtype, list] = {}  # per dtype: [two buffers, which one is next]


def _staging(like: torch.Tensor) -> torch.Tensor:
    """A pinned host buffer for `like`, two reused in turn: with asynchronous scheduling the next step's results
    are queued before the host has read the previous step's."""
    bufs = _STAGING.setdefault(like.dtype, [[None, None], 0])
    turn = bufs[1]
    bufs[1] ^= 1
    buf = bufs[0][turn]
    if buf is None or buf.numel() < like.numel():
        buf = torch.empty(max(like.numel(), 1024), dtype=like.dtype, pin_memory=True)
        bufs[0][turn] = buf
    return buf[: like.numel()].view(like.shape)


def sample_async(logits: torch.Tensor, seqs: Seq[Sequence], stop_ids: Seq[set[int]]) -> PendingSample:
    """`sample` with the host's part deferred: every device operation is queued now, `result()` returns the
    tokens (and appends logprobs to their sequences)."""
    num_rows, vocab = logits.shape
    if num_rows == 0:
        return PendingSample(None, lambda _: [])
    device = logits.device
    params = [s.params for s in seqs]

    # --- host side: which rows need what, packed for one host->device copy
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    seeded = [i for i in sampled if seqs[i].generator is not None]
    unseeded = [i for i in sampled if seqs[i].generator is None]
    by_k = [i for i in sampled if 0 < params[i].top_k < vocab]  # top-k (and maybe top-p): `topk` of the widest
    by_p = [i for i in sampled if params[i].top_p < 1.0 and not 0 < params[i].top_k < vocab]  # top-p only: a sort
    penalized = [i for i, p in enumerate(params) if p.penalized]
    bias = [(i * vocab + t, b) for i, p in enumerate(params) for t, b in (p.logit_bias or {}).items() if t < vocab]
    # (a sequence that ended after its step was launched, as one deferred sampler can see, has no mask to follow)
    guided = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.finished]
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    kmax = min(vocab, max((params[i].logprobs for i in want), default=0))
    masked: list[int] = []  # flat indices row * V + token of the stop ids held back by min_tokens
    for i, seq in enumerate(seqs):
        if stop_ids[i] and len(seq.output_ids) < params[i].min_tokens:
            masked.extend(i * vocab + t for t in stop_ids[i] if 0 <= t < vocab)

    pack = _Pack()
    if sampled:
        pack.add("temp", [1.0 if p.greedy else p.temperature for p in params])
        if unseeded and len(unseeded) < num_rows:
            pack.add("unseeded", unseeded)
    groups = []  # (name, width, whether any row has a top-p)
    for name, rows in (("k", by_k), ("p", by_p)):
        if rows:
            width = max(params[i].top_k for i in rows) if name == "k" else vocab
            any_p = any(params[i].top_p < 1.0 for i in rows)
            groups.append((name, width, any_p))
            pack.add(name + "_rows", rows)
            pack.add(name + "_k", [params[i].top_k if name == "k" else vocab for i in rows])
            if any_p:
                pack.add(name + "_p", [params[i].top_p if params[i].top_p < 1.0 else 2.0 for i in rows])  # 2: all
    if masked:
        pack.add("masked", masked)
    if want and len(want) < num_rows:
        pack.add("want", want)
    if penalized:
        _pack_penalties(pack, seqs, penalized, vocab)
    if bias:
        pack.add("bias_at", [at for at, _ in bias])
        pack.add("bias", [b for _, b in bias])
    if guided:
        pack.add("guided", guided)
    dev = pack.send(device)
    masks = None
    if guided:  # the model's step is queued already: the host computes the masks while the device runs it
        host_masks = fill_bitmasks([seqs[i].grammar for i in guided], vocab, pin=device.type == "cuda")
        masks = host_masks.to(device, non_blocking=True)

    # --- device side: no host synchronisation until the single copy back
    x = logits.float()
    owned = False  # whether x is our own copy (logits themselves are never modified)
    counts = None
    if penalized:
        x, owned = x.clone(), True
        counts = _apply_penalties(x, seqs, penalized, dev)
    if bias:
        if not owned:
            x, owned = x.clone(), True
        x.view(-1).index_add_(0, dev["bias_at"].long(), dev["bias"].to(x.dtype))
    if guided:
        if not owned:
            x, owned = x.clone(), True
        apply_bitmasks(x, dev["guided"].long(), masks)
    if sampled:
        x = x / dev["temp"].to(x.dtype).unsqueeze(1)  # greedy rows divide by 1.0: exact
        owned = True
    if masked:
        flat = dev["masked"].long()
        if owned:
            x.view(-1).index_fill_(0, flat, float("-inf"))
        else:
            x = x.reshape(-1).index_fill(0, flat, float("-inf")).view(num_rows, vocab)
    if groups:
        _filter_rows(x, [(dev[name + "_rows"].long(), dev[name + "_k"].long(),
                          dev[name + "_p"].to(x.dtype) if any_p else None, width) for name, width, any_p in groups])
    if sampled:
        if len(unseeded) == num_rows:
            race = torch.empty_like(x).exponential_()
        else:  # greedy rows keep E = 1: no noise
            race = torch.ones_like(x)
            if unseeded:
                race.index_copy_(0, dev["unseeded"].long(), x.new_empty(len(unseeded), vocab).exponential_())
        for i in seeded:
            gen = seqs[i].generator
            if gen.device == race.device:
                race[i].exponential_(generator=gen)
            else:  # a generator on another device: draw there, copy over (no host sync)
                race[i].copy_(torch.empty(vocab, device=gen.device).exponential_(generator=gen), non_blocking=True)
        x.sub_(race.clamp_min_(_TINY).log_())  # greedy rows: log(1) = 0, x unchanged
    tokens = x.argmax(-1)
    if counts is not None:  # the sampled tokens join the counts on the device: no host round trip
        rows = dev["pen_rows"].long()
        counts[:, 0].scatter_add_(1, tokens.index_select(0, rows).unsqueeze(1),
                                  torch.ones(len(penalized), 1, dtype=counts.dtype, device=device))

    if not want:
        return PendingSample(tokens, lambda host: host, tokens)
    lp, want_tokens = logits, tokens
    if len(want) < num_rows:
        rows = dev["want"].long()
        lp, want_tokens = logits.index_select(0, rows), tokens.index_select(0, rows)
    lp = lp.float().log_softmax(-1)
    chosen = lp.gather(1, want_tokens.unsqueeze(1))
    parts = [tokens.double(), chosen.double().flatten()]
    if kmax:
        top = lp.topk(kmax)
        parts += [top.indices.double().flatten(), top.values.double().flatten()]
    return PendingSample(torch.cat(parts), lambda host: _unpack(host, seqs, want, kmax), tokens)


def _pack_penalties(pack: _Pack, seqs: Seq[Sequence], rows: list[int], vocab: int) -> None:
    """Penalty parameters, and for a row penalised for the first time the flat indices of its prompt and output
    tokens (once per sequence: afterwards its counts live on the device)."""
    params = [seqs[i].params for i in rows]
    pack.add("pen_rows", rows)
    pack.add("pen", [v for p in params for v in (p.repetition_penalty, p.frequency_penalty, p.presence_penalty)])
    prompt, output = [], []
    for j, i in enumerate(rows):
        seq = seqs[i]
        if seq.penalty_counts is None:
            base = j * 2 * vocab
            output.extend(base + t for t in seq.output_ids)
            prompt.extend(base + vocab + t for t in set(seq.prompt.token_ids) if 0 <= t < vocab)
    if output:
        pack.add("pen_output", output)
    if prompt:
        pack.add("pen_prompt", prompt)


def _apply_penalties(x: torch.Tensor, seqs: Seq[Sequence], rows: list[int], dev: dict) -> torch.Tensor:
    """In place on x ([B, V], raw logits); returns the rows' [P, 2, V] state (generated-token counts, prompt
    presence), which becomes each sequence's `penalty_counts` (views of it)."""
    vocab = x.shape[1]
    zero = None
    states = []
    for i in rows:
        state = seqs[i].penalty_counts
        if state is None:
            if zero is None:
                zero = torch.zeros(2, vocab, device=x.device)
            state = zero
        states.append(state)
    counts = torch.stack(states)
    if "pen_output" in dev:
        flat = counts.view(-1)
        flat.index_put_((dev["pen_output"].long(),), torch.ones_like(dev["pen_output"], dtype=flat.dtype),
                        accumulate=True)
    if "pen_prompt" in dev:
        counts.view(-1).index_fill_(0, dev["pen_prompt"].long(), 1.0)
    for j, i in enumerate(rows):
        seqs[i].penalty_counts = counts[j]
    rep, freq, pres = dev["pen"].to(x.dtype).view(-1, 3).unbind(1)
    idx = dev["pen_rows"].long()
    sub = x.index_select(0, idx)
    generated = counts[:, 0]
    seen = (generated > 0) | (counts[:, 1] > 0)
    scaled = torch.where(sub > 0, sub / rep.unsqueeze(1), sub * rep.unsqueeze(1))
    sub = torch.where(seen, scaled, sub)
    sub -= freq.unsqueeze(1) * generated + pres.unsqueeze(1) * (generated > 0).to(sub.dtype)
    x.index_copy_(0, idx, sub)
    return counts


def _unpack(host: list[float], seqs: Seq[Sequence], want: list[int], kmax: int) -> list[int]:
    """Tokens from the packed copy; logprob entries appended to the sequences that asked for them."""
    num_rows = len(seqs)
    params = [s.params for s in seqs]
    out = [int(t) for t in host[:num_rows]]
    n = len(want)
    chosen_lp = host[num_rows : num_rows + n]
    top_ids = host[num_rows + n : num_rows + n + n * kmax]
    top_vals = host[num_rows + n + n * kmax :]
    for j, i in enumerate(want):
        k = min(params[i].logprobs, kmax)
        entry = {int(t): v for t, v in zip(top_ids[j * kmax : j * kmax + k], top_vals[j * kmax : j * kmax + k])}
        entry[out[i]] = chosen_lp[j]
        if seqs[i].logprobs is None:
            seqs[i].logprobs = []
        seqs[i].logprobs.append(entry)
    return out
