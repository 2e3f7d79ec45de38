"""`/v1/chat/completions` and `/v1/completions`: request -> checked engine prompts -> responses or SSE chunks.

Everything a client can get wrong is found before the request reaches the engine (model name, sampling
options, images, prompt and context length), and each becomes an OpenAI-shaped error. Preparing prompts
(image decoding, chat template, tokenisation) runs in a worker thread, so it never holds up the event loop
or the engine's steps.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.multimodal.chat import MediaSources, chat_media, parse_messages
from valora.multimodal.inputs import InputError, MediaError, load_image
from valora.multimodal.template import render_chat
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams
from valora.server.async_engine import AsyncEngine, ClientDisconnectedError, EngineDeadError
from valora.server.errors import APIError, bad_request
from valora.server.logs import logger
from valora.server.models import ServedModels
from valora.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    HeadResult,
    RequestTimings,
    SamplingFields,
    Usage,
)


@dataclass
class Prepared:
    """One engine request, checked: its prompt, options and adapter."""

    request_id: str
    prompt: Any
    params: SamplingParams | HeadParams
    lora: LoRARequest | None
    num_prompt_tokens: int


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, models: ServedModels, allowed_local_media_path: Path | None,
                 allow_special_tokens_in_messages: bool = False, log_requests: bool = True) -> None:
        self.engine = engine
        self.log_requests = log_requests
        self.models = models
        self.allow_special_tokens = allow_special_tokens_in_messages
        self.llm = engine.engine  # read-only use from worker threads: tokenizer, processor, limits
        self.media = MediaSources.from_config(self.llm.config.multimodal, allowed_local_media_path)

    def close(self) -> None:
        self.media.close()

    # -- preparation --------------------------------------------------------------------------------------
    @staticmethod
    def sampling_params(req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        try:
            return SamplingParams(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
            )
        except ValueError as e:
            raise bad_request(str(e), "invalid_value") from e

    def _decode_images(self, raw: list) -> list:
        limits = self.llm.config.multimodal
        if len(raw) > limits.max_images_per_prompt:
            raise bad_request(f"{len(raw)} images in one request, over the limit of "
                              f"{limits.max_images_per_prompt}", "too_many_images", "messages")
        try:
            return [load_image(img, limits) for img in raw]
        except InputError as e:
            raise bad_request(str(e), "invalid_image", "messages") from e

    def _head_params(self, lora: LoRARequest | None, head: str | None, required: bool) -> HeadParams | None:
        """A chat is answered by a head when it names one or its adapter has a default head; a classification
        always is. Checked here so that a wrong head is a 400 naming the choices."""
        heads = self.llm.heads.get(lora.lora_name) if lora is not None else None
        if head is None and not required and (heads is None or heads.default is None):
            return None
        if heads is None:
            what = f"adapter `{lora.lora_name}`" if lora is not None else "the base model"
            raise bad_request(f"{what} has no task head; only adapters trained with heads answer with one",
                              "no_task_head", "model")
        try:
            return HeadParams(heads.resolve(head))
        except KeyError as e:
            raise bad_request(str(e.args[0]), "invalid_head", "head") from e

    def _chat_prompt(self, req: ChatCompletionRequest | ClassificationRequest) -> dict:
        limits = self.llm.config.multimodal
        try:
            messages, raw_images, raw_videos = parse_messages(req.messages, self.media, limits)
        except MediaError as e:  # an image or video URL that cannot be used
            raise bad_request(str(e), f"invalid_{e.kind}", "messages") from e
        except InputError as e:
            raise bad_request(str(e), "invalid_messages", "messages") from e
        images = self._decode_images(raw_images)
        try:
            messages, images, videos = chat_media(messages, images, raw_videos, limits, req.media_io_kwargs,
                                                  frames_as_images=self.llm.processor.video_token is None)
        except MediaError as e:
            raise bad_request(str(e), f"invalid_{e.kind}", "messages") from e
        try:
            prompt = render_chat(self.llm.tokenizer, messages, req.add_generation_prompt,
                                 allow_special_tokens=self.allow_special_tokens)
        except Exception as e:  # jinja raises many types for messages a template cannot render
            raise bad_request(f"cannot apply the chat template: {e}", "invalid_messages", "messages") from e
        key = "prompt" if isinstance(prompt, str) else "prompt_token_ids"
        return {key: prompt, "multi_modal_data": {"image": images, "video": videos}}

    def _check(self, request_id: str, prompt: Any, params: SamplingParams | HeadParams, lora: LoRARequest | None,
               max_tokens: int | None) -> Prepared:
        """Tokenise (and preprocess images) once to refuse what the engine would: too long, bad ids."""
        try:
            _, processed = self.llm.process_prompt(prompt)
        except InputError as e:
            raise bad_request(str(e), "invalid_prompt", "prompt") from e
        n = len(processed.token_ids)
        limit = self.llm.max_model_len
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(
                f"'max_tokens' is too large: {max_tokens}. This model's maximum context length is {limit} tokens "
                f"and your request has {n} input tokens ({max_tokens} > {limit} - {n})",
                "context_length_exceeded", "max_tokens")
        return Prepared(request_id, prompt, params, lora, n)

    def _prepare_chat(self, req: ChatCompletionRequest, request_id: str, lora) -> list[Prepared]:
        head = self._head_params(lora, req.head, required=False)
        if head is not None and req.n != 1:
            raise bad_request("a task head gives one answer: n must be 1", "invalid_value", "n")
        params = head or self.sampling_params(req, req.token_limit)
        return [self._check(request_id, self._chat_prompt(req), params, lora, None if head else req.token_limit)]

    def _prepare_classify(self, req: ClassificationRequest, request_id: str, lora) -> list[Prepared]:
        params = self._head_params(lora, req.head, required=True)
        prompts = [self._chat_prompt(req)] if req.messages is not None else [{"prompt": p} for p in req.prompts()]
        return [self._check(f"{request_id}-{i}", p, params, lora, None) for i, p in enumerate(prompts)]

    def _prepare_completion(self, req: CompletionRequest, request_id: str, lora) -> list[Prepared]:
        params = self.sampling_params(req, req.token_limit)
        prepared = []
        for i, p in enumerate(req.prompts()):
            prompt = {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
            prepared.append(self._check(f"{request_id}-{i}", prompt, params, lora, req.token_limit))
        return prepared

    # -- running ------------------------------------------------------------------------------------------
    def _streams(self, prepared: list[Prepared], arrival: float,
                 is_disconnected: Callable[[], Awaitable[bool]] | None) -> AsyncIterator[tuple[int, RequestOutput]]:
        gens = [self.engine.generate(p.request_id, p.prompt, p.params, p.lora, arrival, is_disconnected)
                for p in prepared]
        return _merge(gens)

    async def chat(self, req: ChatCompletionRequest, is_disconnected) -> BaseModel | AsyncIterator[str]:
        return await self._serve(req, "chatcmpl", self._prepare_chat, _ChatFormat(), is_disconnected)

    async def completion(self, req: CompletionRequest, is_disconnected) -> BaseModel | AsyncIterator[str]:
        return await self._serve(req, "cmpl", self._prepare_completion, _CompletionFormat(), is_disconnected)

    async def classify(self, req: ClassificationRequest, is_disconnected) -> BaseModel:
        return await self._serve(req, "classify", self._prepare_classify, _ClassifyFormat(), is_disconnected)

    async def _serve(self, req: SamplingFields | ClassificationRequest, prefix: str, prepare, fmt: _Format,
                     is_disconnected) -> BaseModel | AsyncIterator[str]:
        arrival = time.time()
        lora = self.models.resolve(req.model)
        self.engine.check_capacity()  # refuse early, before any preprocessing work
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        prepared = await asyncio.to_thread(prepare, req, request_id, lora)
        self.engine.check_capacity(len(prepared))
        call = _Call(request_id, req.model or self.models.name, req, prepared, arrival, self.log_requests)
        if req.stream:
            return self._stream(call, fmt)
        return await self._collect(call, fmt, is_disconnected)

    async def _collect(self, call: _Call, fmt: _Format, is_disconnected) -> BaseModel:
        finals: dict[int, RequestOutput] = {}
        try:
            async with aclosing(self._streams(call.prepared, call.arrival, is_disconnected)) as outputs:
                async for i, out in outputs:
                    if out.finished:
                        finals[i] = out
        except ClientDisconnectedError:
            self._aborted(call, finals.values())
            raise
        outs = [finals[i] for i in range(len(call.prepared))]
        call.log(outs)
        return fmt.response(call, outs)

    async def _stream(self, call: _Call, fmt: _Format) -> AsyncIterator[str]:
        n = call.req.n
        params = call.prepared[0].params
        deltas = _TextDeltas(len(call.prepared) * n, params.stop if isinstance(params, SamplingParams) else [])
        finals: dict[int, RequestOutput] = {}
        opts = call.req.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)
        latest: dict[int, RequestOutput] = {}  # per prompt, for continuous usage
        tokens_seen: dict[int, int] = {}
        done = False
        first = fmt.first_chunk(call)
        try:
            if first is not None:
                yield _sse(first)
            async with aclosing(self._streams(call.prepared, call.arrival, None)) as outputs:
                async for i, out in outputs:
                    choices = []
                    for c in out.outputs:
                        index = i * n + c.index
                        text, first_finish = deltas.next(index, c.text, c.finish_reason)
                        advanced = len(c.token_ids) > tokens_seen.get(index, 0)
                        tokens_seen[index] = len(c.token_ids)
                        if text or first_finish or (continuous and advanced):
                            choices.append((index, text, c.finish_reason if first_finish else None, c.stop_reason,
                                            c.head if first_finish else None))
                    if out.finished:
                        finals[i] = out
                    latest[i] = out
                    if choices:
                        last = len(finals) == len(call.prepared) and not call.req.include_usage
                        timings = _timings(list(finals.values())) if last else None
                        chunk = fmt.chunk(call, choices, timings)
                        if continuous:
                            chunk.usage = _usage(list(latest.values()))
                        yield _sse(chunk)
            outs = [finals[i] for i in range(len(call.prepared))]
            if call.req.include_usage:
                yield _sse(fmt.usage_chunk(call, _usage(outs), _timings(outs)))
            yield "data: [DONE]\n\n"
            done = True
            call.log(outs)
        except Exception as e:  # the stream has started (status 200 is sent): report in-band, as OpenAI does
            done = True
            if isinstance(e, (APIError, ValueError)):  # refused when added (InputError / AdapterError are ValueErrors)
                call.log(finals.values(), f"refused: {e}")
                err = e if isinstance(e, APIError) else bad_request(str(e), "invalid_request")
            else:
                logger.exception("stream %s failed", call.request_id)
                err = APIError(503 if isinstance(e, EngineDeadError) else 500, str(e), "internal_error")
            yield _sse(err.body())
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                self._aborted(call, finals.values())

    def _aborted(self, call: _Call, finals) -> None:
        """A client that left: logged, and counted in `request_success_total{finished_reason="abort"}` whether or
        not the engine had accepted its request yet."""
        call.log(finals, "client disconnected, aborted")
        if self.engine.metrics is not None:
            self.engine.metrics.aborted(len(call.prepared) * getattr(call.req, "n", 1))


@dataclass
class _Call:
    request_id: str
    model: str
    req: SamplingFields | ClassificationRequest
    prepared: list[Prepared]
    arrival: float
    logged: bool = True
    created: int = field(init=False)

    def __post_init__(self) -> None:
        self.created = int(self.arrival)

    def log(self, outs, note: str | None = None) -> None:
        if not self.logged:
            return
        outs = list(outs)
        usage = _usage(outs)
        t = _timings(outs) if outs and len(outs) == len(self.prepared) else RequestTimings()
        finish = ",".join(sorted({c.finish_reason or "-" for o in outs for c in o.outputs})) or "-"
        logger.info(
            "%s model=%s stream=%s prompt_tokens=%d completion_tokens=%d finish=%s queue=%s ttft=%s e2e=%s%s",
            self.request_id, self.model, self.req.stream, sum(p.num_prompt_tokens for p in self.prepared),
            usage.completion_tokens, finish, _secs(t.queue_time), _secs(t.time_to_first_token),
            _secs(t.e2e_latency), f" ({note})" if note else "",
        )


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}s"


def _usage(outs: list[RequestOutput]) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _timings(outs: list[RequestOutput]) -> RequestTimings:
    """Over all prompts of a call: the earliest arrival to the latest first-schedule / first token / finish."""
    ms = [o.metrics for o in outs if o.metrics is not None]
    if not ms:
        return RequestTimings()
    arrival = min(m.arrival_time for m in ms)

    def span(attr: str) -> float | None:
        values = [getattr(m, attr) for m in ms]
        return None if any(v is None for v in values) else max(values) - arrival

    return RequestTimings(queue_time=span("first_scheduled_time"), time_to_first_token=span("first_token_time"),
                          e2e_latency=span("finished_time"))


def _sse(payload: BaseModel | dict) -> str:
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_none=True)}\n\n"
    return f"data: {json.dumps(payload)}\n\n"


class _TextDeltas:
    """Text to send per choice. While a choice runs, the last (longest stop string - 1) characters are held
    back: the engine may still cut them off when a stop string completes, and sent text cannot be recalled."""

    def __init__(self, num_choices: int, stop: list[str]) -> None:
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = [0] * num_choices
        self.finished = [False] * num_choices

    def next(self, index: int, text: str, finish_reason: str | None) -> tuple[str, bool]:
        """(new text, whether this choice finished just now)."""
        if self.finished[index]:
            return "", False
        done = finish_reason is not None
        end = len(text) if done else max(self.sent[index], len(text) - self.hold)
        delta = text[self.sent[index]:end]
        self.sent[index] = end
        self.finished[index] = done
        return delta, done


class _Format(Protocol):
    """How one endpoint spells its chunks and responses."""

    def first_chunk(self, call: _Call) -> BaseModel | None: ...

    def chunk(self, call: _Call, choices: list[tuple], timings: RequestTimings | None) -> BaseModel: ...

    def usage_chunk(self, call: _Call, usage: Usage, timings: RequestTimings) -> BaseModel: ...

    def response(self, call: _Call, outs: list[RequestOutput]) -> BaseModel: ...


class _ChatFormat:
    def first_chunk(self, call):
        choices = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                   for i in range(call.req.n)]
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=choices)

    def chunk(self, call, choices, timings):
        items = [ChatChunkChoice(index=i, delta=DeltaMessage(content=text), finish_reason=fr, stop_reason=sr,
                                 head=_head_result(h)) for i, text, fr, sr, h in choices]
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=items,
                                   metrics=timings)

    def usage_chunk(self, call, usage, timings):
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=[],
                                   usage=usage, metrics=timings)

    def response(self, call, outs):
        choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason, head=_head_result(c.head)) for c in outs[0].outputs]
        return ChatCompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=choices,
                                      usage=_usage(outs), metrics=_timings(outs))


class _CompletionFormat:
    def first_chunk(self, call):
        return None

    def chunk(self, call, choices, timings):
        items = [CompletionChoice(index=i, text=text, finish_reason=fr, stop_reason=sr)
                 for i, text, fr, sr, _ in choices]
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=items,
                                  metrics=timings)

    def usage_chunk(self, call, usage, timings):
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=[],
                                  usage=usage, metrics=timings)

    def response(self, call, outs):
        n = call.req.n
        choices = [CompletionChoice(index=i * n + c.index, text=c.text, finish_reason=c.finish_reason,
                                    stop_reason=c.stop_reason) for i, o in enumerate(outs) for c in o.outputs]
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=choices,
                                  usage=_usage(outs), metrics=_timings(outs))


class _ClassifyFormat:
    """Non-streaming only (the request model refuses `stream`)."""

    def response(self, call, outs):
        data = []
        for i, o in enumerate(outs):
            h = o.outputs[0].head
            labels = list(h.scores) if h.scores is not None else None
            data.append(ClassificationData(index=i, label=h.label, head=h.head, labels=labels, box=h.box,
                                           probs=list(h.scores.values()) if labels else None,
                                           num_classes=len(labels or ())))
        return ClassificationResponse(id=call.request_id, created=call.created, model=call.model, data=data,
                                      usage=_usage(outs), metrics=_timings(outs))


def _head_result(h) -> HeadResult | None:
    return None if h is None else HeadResult(name=h.head, label=h.label, scores=h.scores, box=h.box)


async def _merge(gens: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come, tagged with the request's position. Leaving early
    (or one request failing) cancels the rest, which aborts them in the engine."""
    q: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, gen: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in gen:
                q.put_nowait((i, out))
            q.put_nowait((i, end))
        except Exception as e:
            q.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
