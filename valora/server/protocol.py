"""The OpenAI wire format: request bodies (validated by pydantic) and response bodies.

Fields follow OpenAI's API, plus the extras vLLM users send (`top_k`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, ...). Responses carry one extra object, `metrics`, with the request's queue time and
latencies as the server measured them. A chat answered by a task head carries it in each choice's `head`
(`head` in the request picks one); `/v1/classify` follows vLLM's classification API.

Requests are validated strictly, as OpenAI's API does (`"max_tokens": "16"` is an error, not 16), and every
shape is spelled out (messages and their content parts too), so `/openapi.json` says exactly what is accepted.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from valora.lora.request import ADAPTER_NAME_PATTERN
from valora.sampling_params import SEED_RANGE, StructuredOutputsParams

logger = logging.getLogger(__name__)

_STRUCTURED_OPTIONS = ("disable_any_whitespace",)  # keys of `structured_outputs` that say how, not what
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs; OpenAI's limit for top_logprobs

# `model`: a served name or an adapter name (or `base:adapter`); printable (no control characters, so it cannot
# forge a log line) and bounded, since it is echoed in errors and logs.
MODEL_NAME_MAX = 1024
MODEL_NAME_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
ModelName = Annotated[str, Field(max_length=MODEL_NAME_MAX, pattern=MODEL_NAME_PATTERN)]
AdapterName = Annotated[str, Field(min_length=1, max_length=128, pattern=ADAPTER_NAME_PATTERN)]


class Strict(BaseModel):
    """Request bodies: JSON types as declared (no "5" for 5); unknown fields ignored, as OpenAI's API does."""

    model_config = ConfigDict(extra="ignore", strict=True)


_WARNED_FIELDS: set[str] = set()


@functools.cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    """A body's field names and aliases, once per class rather than per request."""
    return frozenset(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


class Body(Strict):
    """A whole request body: the fields it ignores are logged, each name once per process (vLLM warns of them per
    request), so a client that misspells an option or relies on one this server lacks shows up in the log."""

    @model_validator(mode="before")
    @classmethod
    def _warn_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = _field_names(cls)
            new = sorted(k for k in data if isinstance(k, str) and k not in known and k not in _WARNED_FIELDS)
            if new:
                _WARNED_FIELDS.update(new)
                logger.warning("%s fields ignored (not used by this server): %s", cls.__name__,
                               ", ".join(k[:64] for k in new[:20]))
        return data


class ChatTemplateFields(Strict):
    """How chat messages become the prompt (chat, classification, tokenize)."""

    add_generation_prompt: bool = True
    # vLLM's: the prompt ends inside the last message, which the model continues (`render_chat` refuses it together
    # with add_generation_prompt, for the offline API too)
    continue_final_message: bool = False
    media_io_kwargs: dict[str, Any] | None = None  # vLLM's: {"video": {"fps": ..., "num_frames": ...}}


class MediaURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # OpenAI's; accepted, not used


class TextPart(Strict):
    type: Literal["text", "input_text"]
    text: str


class ImageURLPart(Strict):
    type: Literal["image_url"]
    image_url: MediaURL | str


class ImagePart(Strict):
    """`{"type": "image", "image": URL}`, or the Responses API's `{"type": "input_image", "image_url": URL}`."""

    type: Literal["image", "input_image"]
    image: str | None = None
    image_url: MediaURL | str | None = None


class VideoURLPart(Strict):
    type: Literal["video_url"]
    video_url: MediaURL | str


class VideoPart(Strict):
    type: Literal["video", "input_video"]
    video: str | None = None
    video_url: MediaURL | str | None = None


ContentPart = Annotated[TextPart | ImageURLPart | ImagePart | VideoURLPart | VideoPart, Field(discriminator="type")]


class ChatMessageParam(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # refused: dropping them would change the conversation

    @field_validator("tool_calls")
    @classmethod
    def _no_tool_calls(cls, v):
        if v:
            raise ValueError(_NO_TOOLS)
        return None  # an empty list says nothing; the template never sees it


_NO_TOOLS = "tool calling is not supported by this server (it has no tool-call parser)"


def message_dicts(messages: list[ChatMessageParam]) -> list[dict[str, Any]]:
    """As `parse_messages` (shared with the offline API) takes them."""
    return [m.model_dump(exclude_none=True) for m in messages]


class SamplingFields(Body):
    """Decoding options shared by chat and completions."""

    model: ModelName = ""
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
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0)  # vLLM's
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as JSON keys are strings) -> bias in [-100, 100]
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs, or vLLM's older guided_* fields
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The request's grammar, from whichever spelling it used (one of them). Raises ValueError."""
        given: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            given.append(("response_format", {"json_object": True}))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema.schema")
            given.append(("response_format", {"json": rf.json_schema.json_schema}))
        spec = dict(self.structured_outputs or {})
        options = {k: spec.pop(k) for k in _STRUCTURED_OPTIONS if k in spec}  # these combine with any spelling
        if spec:
            given.append(("structured_outputs", spec))
        guided = {k: getattr(self, f"guided_{k}") for k in ("json", "regex", "choice", "grammar")
                  if getattr(self, f"guided_{k}") is not None}
        if guided:
            given.append(("guided_" + "/".join(guided), guided))
        if len(given) > 1:
            raise ValueError(f"give one way of constraining the output, not {' and '.join(n for n, _ in given)}")
        if not given:
            return None
        try:
            return StructuredOutputsParams(**given[0][1], **options)
        except TypeError as e:  # an unknown key in structured_outputs
            raise ValueError(f"{given[0][0]}: {e}") from e

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JSONSchemaFormat(Strict):
    """OpenAI's `response_format.json_schema`: a named schema (`strict` is accepted; the grammar is always strict)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = "response"
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(Strict):
    include_usage: bool = False
    # vLLM's: `usage` in every chunk, and a chunk for every step that produced tokens, even tokens that add no text
    # yet (an incomplete character, a token of a random model's vocabulary the tokenizer does not cover)
    continuous_usage_stats: bool = False


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    head: str | None = None  # VaLoRA: answer with this task head of the adapter instead of decoding
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # Fields that would change the answer and that this server cannot honour: refused, not ignored.
    tools: list[dict[str, Any]] | None = None  # allowed only with tool_choice "none" (then no tool is called)
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _unsupported(self) -> ChatCompletionRequest:
        if (self.tools and self.tool_choice != "none") or self.tool_choice not in (None, "none"):
            raise ValueError(f"{_NO_TOOLS}: send tools only with tool_choice \"none\"")
        if self.functions or self.function_call is not None:
            raise ValueError(f"functions and function_call: {_NO_TOOLS}")
        if self.audio is not None or set(self.modalities or ()) - {"text"}:
            raise ValueError("this server answers in text only (modalities [\"text\"], no audio)")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token the engine reports (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions
    echo: bool = False  # the prompt before the completion in each choice's text (and logprobs, as null)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None  # refused: no insertion mode
    best_of: int | None = Field(None, ge=1)  # only equal to n: every completion is returned

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported (no fill-in-the-middle mode)")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of ({self.best_of}) other than n ({self.n}) is not supported: every completion "
                             "is returned; ask for n completions and keep the best")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

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


class LoadLoRAAdapterRequest(Body):
    lora_name: AdapterName
    # NUL bytes and over-long paths are refused as `invalid_lora_path` (valora.paths), before any filesystem call
    lora_path: str = Field(min_length=1)


class UnloadLoRAAdapterRequest(Body):
    lora_name: AdapterName


class ClassificationRequest(Body, ChatTemplateFields):
    """`POST /v1/classify`, shaped like vLLM's: one chat (`messages`, images allowed) or text prompts (`input`),
    answered by a task head of the adapter `model` after one prefill."""

    model: ModelName = ""
    messages: list[ChatMessageParam] | None = Field(None, min_length=1)
    input: str | list[str] | None = None
    head: str | None = None  # which head of the adapter; default: its default head, else its only one
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    """OpenAI's chat `logprobs`: per generated token its own log-probability and the `top_logprobs` best."""

    content: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions `logprobs`: parallel lists over the tokens of the choice's text."""

    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: str | None
    stop_reason: str | int | None = None
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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
    logprobs: CompletionLogprobs | None = None


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


class TokenizeRequest(Body, ChatTemplateFields):
    """vLLM's `POST /tokenize`: a text `prompt`, or chat `messages` (the chat template applied, images counted as
    the tokens they take)."""

    model: ModelName = ""
    prompt: str | None = None
    messages: list[ChatMessageParam] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(Body):
    model: ModelName = ""
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class VersionResponse(BaseModel):
    version: str
