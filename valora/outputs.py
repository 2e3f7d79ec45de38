"""Results as vLLM returns them: one `RequestOutput` per request with `n` `CompletionOutput`s."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class HeadOutput:
    """A task head's answer to a request, given after its prefill with no decoding (see `valora.heads`)."""

    head: str  # the head's name
    label: str  # the answer as text: the class label, or the box as "(x1,y1),(x2,y2)" on a 0-100 grid
    scores: dict[str, float] | None = None  # classification: the probability of every class label
    box: list[float] | None = None  # box regression: [x1, y1, x2, y2] as fractions of the image size


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per step: top-k and the chosen token's log-probability
    head: HeadOutput | None = None  # set when a task head answered instead of decoding


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_name: str | None = None
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    extra: dict = field(default_factory=dict)
