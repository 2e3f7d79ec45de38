"""Per-request decoding options, named as in vLLM's `SamplingParams` (and `StructuredOutputsParams`).

Plain, picklable data: everything the sampler needs travels inside `SamplingParams`, grammars included (as their
source; the engine compiles them).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StructuredOutputsParams:
    """Constrain the output to a grammar, as vLLM's `StructuredOutputsParams`: exactly one of a JSON schema
    (`json`, a dict or its JSON text), any JSON object (`json_object`), a regular expression (`regex`), one of
    several strings (`choice`), or a Lark / GBNF grammar (`grammar`). `disable_any_whitespace` makes JSON compact
    (no whitespace between tokens), which also keeps weak models from emitting whitespace forever."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in ("json", "regex", "choice", "grammar", "json_object") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("structured outputs take exactly one of json, regex, choice, grammar or json_object"
                             + (f"; got {', '.join(given)}" if given else ""))
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("choice must be a non-empty list of strings")
        if isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from e

    @property
    def key(self) -> str:
        """What identifies the compiled grammar (equal keys share one compilation)."""
        spec = {k: getattr(self, k) for k in ("json", "regex", "choice", "grammar", "json_object")
                if getattr(self, k)}
        if isinstance(spec.get("json"), str):
            spec["json"] = json.loads(spec["json"])
        return json.dumps([spec, self.disable_any_whitespace], sort_keys=True)


LOGIT_BIAS = 100  # OpenAI's bound on a logit_bias value: -100 bans a token, 100 all but forces it
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as vLLM documents; `seed + i` for the i-th of n samples still fits torch


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # also return the top-k log-probabilities of the model at every step
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling (OpenAI's)

    def __post_init__(self) -> None:
        """Every field range-checked here, so that no caller (server, offline API) can hand the engine a value
        that fails later, mid-step (a seed torch cannot take, a NaN temperature)."""
        _integer("n", self.n, 1)
        if not _real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature}")
        if not _real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        _integer("top_k", self.top_k, -1, what="-1 (disabled) or positive")
        if self.seed is not None:
            _integer("seed", self.seed, *SEED_RANGE)
        if self.max_tokens is not None:
            _integer("max_tokens", self.max_tokens, 1)
        _integer("min_tokens", self.min_tokens, 0, self.max_tokens, what="in [0, max_tokens]")
        if self.logprobs is not None:
            _integer("logprobs", self.logprobs, 0)
        for name in ("presence_penalty", "frequency_penalty"):
            if not _real(getattr(self, name)) or not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not _real(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple, type(None))) or not all(isinstance(s, str) for s in self.stop or []):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        for t in self.stop_token_ids:
            _integer("stop_token_ids", t, 0, what="non-negative token ids")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}")
            for t, bias in self.logit_bias.items():
                _integer("logit_bias keys", t, 0, what="non-negative token ids")
                if not _real(bias) or not -LOGIT_BIAS <= bias <= LOGIT_BIAS:
                    raise ValueError(f"logit_bias values must be in [-{LOGIT_BIAS}, {LOGIT_BIAS}], got {bias!r} for "
                                     f"token {t}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(name: str, value, low: int, high: int | None = None, what: str | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = what or (f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}")
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
