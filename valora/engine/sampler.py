"""Token selection per sequence: greedy, or temperature / top-k / top-p sampling with optional per-request seeds."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from valora.engine.sequence import Sequence


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: Seq[Sequence], stop_ids: Seq[set[int]]) -> list[int]:
    """logits: [B, V] float32, one row per sequence. `stop_ids[i]` are masked while min_tokens is not reached.
    Sequences that asked for logprobs get the model's own (unprocessed) distribution appended."""
    want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
    logprobs = logits[want].log_softmax(-1) if want else None
    for i, seq in enumerate(seqs):
        if len(seq.output_ids) < seq.params.min_tokens and stop_ids[i]:
            logits[i, list(stop_ids[i])] = float("-inf")
    tokens = logits.argmax(-1).tolist()
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.greedy:
            continue
        row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        tokens[i] = int(torch.multinomial(row.softmax(-1), 1, generator=seq.generator).item())
    for j, i in enumerate(want):
        k = seqs[i].params.logprobs
        top = torch.topk(logprobs[j], k) if k else None
        entry = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
        entry[tokens[i]] = float(logprobs[j, tokens[i]])
        if seqs[i].logprobs is None:
            seqs[i].logprobs = []
        seqs[i].logprobs.append(entry)
    return tokens
