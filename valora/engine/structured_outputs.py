"""Structured outputs: a request's grammar (JSON schema, regex, choice, Lark/GBNF) compiled by llguidance into a
matcher, one matcher per sequence, advanced with every accepted token; each step the matchers of the constrained
rows write their allowed-token bitmasks, which the batched sampler applies on the device.

Compiling is cached by the grammar's source: a request whose grammar was seen before gets a copy of the compiled
matcher (microseconds). Requests without a grammar never reach this module.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from valora.multimodal.inputs import InputError
from valora.sampling_params import StructuredOutputsParams


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError as e:  # a core dependency; only a broken install lacks it
        raise InputError("structured outputs need the llguidance package: pip install llguidance") from e
    return llguidance


def grammar_source(spec: StructuredOutputsParams) -> str:
    """The llguidance grammar for `spec` (not validated yet: compiling does that)."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    if spec.json is not None or spec.json_object:
        schema: Any = spec.json if spec.json is not None else {"type": "object"}
        try:
            return matcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": not spec.disable_any_whitespace})
        except ValueError as e:
            raise InputError(f"invalid JSON schema: {e}") from e
    if spec.regex is not None:
        return matcher.grammar_from_regex(spec.regex)
    if spec.choice is not None:
        return llg.grammar_from("choice", spec.choice)
    try:
        return llg.grammar_from("grammar", spec.grammar)
    except ValueError as e:
        raise InputError(f"invalid grammar: {e}") from e


class GrammarCompiler:
    """Compiled grammars for one tokenizer, least recently used first out. The llguidance tokenizer is built
    on first use (a few milliseconds for small vocabularies, about a second for 150k tokens)."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = 256) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size  # the logits' width: ids the tokenizer lacks are never allowed
        self.eos_token_ids = sorted(eos_token_ids)
        self.cache_size = cache_size
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._tokenizer = None
        self._lock = threading.Lock()  # the server compiles on worker threads

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            llg = _llguidance()
            eos = self.eos_token_ids or None
            try:
                try:
                    self._tokenizer = llg.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=eos)
                except TypeError:  # llguidance 1.6 and older take one end token: the grammar's end allows that one
                    self._tokenizer = llg.hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size,
                                                            eos_token=eos[0] if eos else None)
            except ValueError as e:
                raise InputError(f"structured outputs cannot use this tokenizer: {e}") from e
        return self._tokenizer

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """A fresh matcher for `spec`, at the start of its grammar. Raises `InputError` naming what is wrong."""
        key = spec.key
        with self._lock:
            template = self._compiled.get(key)
            if template is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
            template = _llguidance().LLMatcher(self.tokenizer, grammar_source(spec), log_level=0)
            if template.is_error():
                raise InputError(f"invalid structured output spec: {template.get_error().strip()}")
            self._compiled[key] = template
            if len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
            return template.deep_copy()


_STAGING: dict[str, torch.Tensor] = {}


def fill_bitmasks(matchers: Sequence[Any], vocab_size: int, pin: bool) -> torch.Tensor:
    """[len(matchers), ceil(V / 32)] int32 on the host: bit t of row i set when matchers[i] allows token t next.
    The buffer is reused step after step (its previous contents have reached the device by then: a step's masks
    are copied before the step's results, which the engine waits for before it computes the next masks)."""
    llg = _llguidance()
    words = (vocab_size + 31) // 32
    key = "pinned" if pin else "host"
    buf = _STAGING.get(key)
    if buf is None or buf.shape[0] < len(matchers) or buf.shape[1] != words:
        buf = torch.empty((max(len(matchers), 8), words), dtype=torch.int32, pin_memory=pin)
        _STAGING[key] = buf
    out = buf[: len(matchers)]
    if len(matchers) == 1:
        matchers[0].unsafe_compute_mask_ptr(out.data_ptr(), words * 4)
    else:
        _executor(llg).unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], out.data_ptr(), words * 4,
                                               len(matchers))
    return out


_EXECUTOR: list = []


def _executor(llg):
    """One thread pool for the masks of a batch (llguidance releases the GIL while it computes them)."""
    if not _EXECUTOR:
        _EXECUTOR.append(llg.LLExecutor())
    return _EXECUTOR[0]


def apply_bitmasks(x: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor) -> None:
    """In place: -inf every logit of x[rows[i]] ([B, V]) whose bit in masks[i] ([G, W] int32) is clear."""
    vocab = x.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=masks.device)
    allowed = ((masks.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    x.index_copy_(0, rows, x.index_select(0, rows).masked_fill_(~allowed, float("-inf")))
