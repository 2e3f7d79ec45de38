"""The OpenAI wire format: request bodies (validated by pydantic) and response bodies.

Fields follow OpenAI's API, plus the extras vLLM users send (`top_k`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, ...). Responses carry one extra object, `metrics`, with the request's queue time and
latencies as the server measured them. A chat answered by a task head carries it in each choice's `head`
(`head` in the request picks one); `/v1/classify` follows vLLM's classification API.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from valora.sampling_params import SEED_RANGE


class SamplingFields(BaseModel):
    """Decoding options shared by chat and completions; unknown fields are ignored as OpenAI's API does."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(-1, ge=-1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("presence and frequency penalties are not supported")
        return v

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v):
        if v:
            raise ValueError("logprobs are not supported")
        return v

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    include_usage: bool = False
    # vLLM's: `usage` in every chunk, and a chunk for every step that produced tokens, even tokens that add no text
    # yet (an incomplete character, a token of a random model's vocabulary the tokenizer does not cover)
    continuous_usage_stats: bool = False


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    add_generation_prompt: bool = True
    head: str | None = None  # VaLoRA: answer with this task head of the adapter instead of decoding
    media_io_kwargs: dict[str, Any] | None = None  # vLLM's: {"video": {"fps": ..., "num_frames": ...}}

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: OpenAI accepts a string, a token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


SamplingFields.model_rebuild()


class LoadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(BaseModel):
    lora_name: str = Field(min_length=1)


class ClassificationRequest(BaseModel):
    """`POST /v1/classify`, shaped like vLLM's: one chat (`messages`, images allowed) or text prompts (`input`),
    answered by a task head of the adapter `model` after one prefill."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    messages: list[dict[str, Any]] | None = Field(None, min_length=1)
    input: str | list[str] | None = None
    head: str | None = None  # which head of the adapter; default: its default head, else its only one
    add_generation_prompt: bool = True
    media_io_kwargs: dict[str, Any] | None = None  # vLLM's: {"video": {"fps": ..., "num_frames": ...}}
    stream: Literal[False] = False

    @model_validator(mode="after")
    def _one_input(self) -> ClassificationRequest:
        if (self.messages is None) == (self.input is None) or self.input == []:
            raise ValueError("give exactly one of 'messages' or 'input' (a string or a non-empty list of strings)")
        return self

    def prompts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input or [])


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class RequestTimings(BaseModel):
    """Seconds, measured on the server: arrival -> first scheduled step, first token, and the last token."""

    queue_time: float | None = None
    time_to_first_token: float | None = None
    e2e_latency: float | None = None


class HeadResult(BaseModel):
    """What a task head answered (a VaLoRA extension; the label is also the message content)."""

    name: str
    label: str
    scores: dict[str, float] | None = None  # classification: the probability of every label
    box: list[float] | None = None  # box: [x1, y1, x2, y2] as fractions of the image size


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: None = None
    head: HeadResult | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    metrics: RequestTimings | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: None = None
    head: HeadResult | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    metrics: RequestTimings | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    metrics: RequestTimings | None = None


class ClassificationData(BaseModel):
    index: int
    object: Literal["classification"] = "classification"
    label: str
    probs: list[float] | None = None  # in the order of `labels`; None for a box head
    num_classes: int = 0
    head: str
    labels: list[str] | None = None
    box: list[float] | None = None


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ClassificationData]
    usage: Usage
    metrics: RequestTimings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "valora"
    root: str
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    """Every error, as OpenAI shapes it (documented in the OpenAPI schema for each status a route can answer)."""

    error: ErrorInfo


class HealthStatus(BaseModel):
    status: str
    error: str | None = None
