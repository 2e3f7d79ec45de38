"""`/v1/chat/completions`, `/v1/completions`, `/v1/classify` and the tokenizer endpoints: request -> processed
prompts -> responses or SSE chunks.

A call is admitted first (capacity is held from then on, or 503 at once), its prompts are processed once by the
input processor on a worker thread (chat template, images, videos, tokens: the event loop never waits for them),
every problem a client can cause becomes an OpenAI-shaped error, and the core's acknowledgement of the add comes
before the response starts: a stream never begins with a request the core will refuse.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from valora.engine.errors import EngineDeadError
from valora.heads.params import HeadParams
from valora.lora.adapter import AdapterError
from valora.lora.request import LoRARequest
from valora.multimodal.chat import MediaSources
from valora.multimodal.inputs import InputError
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams
from valora.server.async_engine import AsyncEngine, CallOutputs, ClientDisconnectedError, Prepared
from valora.server.errors import APIError, adapter_load_failed, bad_request
from valora.server.logs import logger
from valora.server.models import ServedModels
from valora.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ClassificationData,
    ClassificationRequest,
    ClassificationResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    HeadResult,
    RequestTimings,
    SamplingFields,
    TokenizeRequest,
    TokenizeResponse,
    TokenLogprob,
    TopLogprob,
    Usage,
    message_dicts,
)


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, models: ServedModels, allowed_local_media_path: Path | None,
                 allow_special_tokens_in_messages: bool = False, log_requests: bool = True,
                 lora_resolver: bool = False) -> None:
        self.engine = engine
        self.log_requests = log_requests
        self.models = models
        self.allow_special_tokens = allow_special_tokens_in_messages
        self.lora_resolver = lora_resolver
        self._resolving: dict[str, asyncio.Future] = {}
        self.inputs = engine.input_processor  # used from worker threads: it keeps no state between calls
        self.token_texts = TokenTexts(self.inputs.tokenizer)
        self.media = MediaSources.from_config(self.inputs.limits, allowed_local_media_path)

    # -- adapters -----------------------------------------------------------------------------------------
    async def load_adapter(self, lora: LoRARequest) -> None:
        """Load `lora` in the engine core and serve it under its name (the core tells every front end, this one
        included, before it answers); raises AdapterError / InputError for an adapter that cannot be served."""
        await self.engine.client.call("load_lora", lora.lora_name, lora.lora_path)

    async def resolve(self, model: str) -> LoRARequest | None:
        """The adapter `model` names (None: the base model). With adapters on first use, an unknown name that is a
        directory under --lora-root is loaded first: once, however many requests name it at the same time."""
        try:
            return self.models.resolve(model)
        except APIError:
            lora = self.models.resolvable(model) if self.lora_resolver else None
            if lora is None:
                raise
        task = self._resolving.get(model)
        if task is None:
            task = self._resolving[model] = asyncio.ensure_future(self.load_adapter(lora))
            task.add_done_callback(lambda _: self._resolving.pop(model, None))
        try:
            await asyncio.shield(task)  # a waiter that goes away does not cancel the load for the others
        except (AdapterError, InputError) as e:
            raise adapter_load_failed(model, e, "model", " from the adapter root") from e
        return self.models.resolve(model)

    def close(self) -> None:
        self.media.close()

    # -- preparation --------------------------------------------------------------------------------------
    def sampling_params(self, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
        """The request's decoding options; a grammar is compiled here (cached), so a bad one is a 400 naming it."""
        try:
            grammar = req.structured_outputs_params()
            if grammar is not None:
                self.inputs.grammars.compile(grammar)
        except ValueError as e:  # InputError from the compiler is one too
            raise bad_request(str(e), "invalid_structured_output", "response_format") from e
        try:
            params = SamplingParams(
                n=req.n, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
                stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, logprobs=req.num_logprobs,
                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                repetition_penalty=req.repetition_penalty, structured_outputs=grammar,
                logit_bias=_token_keys(req.logit_bias),
            )
            self.inputs.check_params(params)
        except InputError as e:
            raise _refused(e, "invalid_value", "logit_bias") from e
        except ValueError as e:
            raise bad_request(str(e), "invalid_value") from e
        return params

    def _head_params(self, lora: LoRARequest | None, head: str | None, required: bool) -> HeadParams | None:
        """A chat is answered by a head when it names one or its adapter has a default head; a classification
        always is. Checked here so that a wrong head is a 400 naming the choices."""
        heads = self.models.heads.get(lora.lora_name) if lora is not None else None
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

    def _chat_prompt(self, req: ChatCompletionRequest | ClassificationRequest | TokenizeRequest) -> dict:
        try:
            return self.inputs.chat_prompt(message_dicts(req.messages), self.media,
                                           add_generation_prompt=req.add_generation_prompt,
                                           allow_special_tokens=self.allow_special_tokens,
                                           media_io_kwargs=req.media_io_kwargs,
                                           continue_final_message=req.continue_final_message)
        except InputError as e:
            raise _refused(e, "invalid_messages", "messages") from e

    def _check(self, request_id: str, prompt: Any, params: SamplingParams | HeadParams, lora: LoRARequest | None,
               max_tokens: int | None) -> Prepared:
        """The prompt processed once: what the core will run, and the refusal of what it could not."""
        try:
            text, processed = self.inputs.process(prompt, max_tokens)
        except InputError as e:
            raise _refused(e, "invalid_prompt", "prompt") from e
        return Prepared(request_id, text, processed, params, lora)

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

    # -- tokenizer endpoints ------------------------------------------------------------------------------
    async def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        """vLLM's /tokenize: the token ids the engine would see (chat template and image tokens included)."""
        await self.resolve(req.model)

        def run() -> TokenizeResponse:
            if req.messages is not None:
                try:
                    ids = self.inputs.process(self._chat_prompt(req))[1].token_ids
                except InputError as e:
                    raise bad_request(str(e), "invalid_prompt", "messages") from e
            else:
                ids = self.inputs.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
            ids = list(ids)
            strs = self.inputs.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
            return TokenizeResponse(count=len(ids), max_model_len=self.inputs.max_model_len, tokens=ids,
                                    token_strs=strs)

        return await asyncio.to_thread(run)

    async def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        await self.resolve(req.model)
        vocab = self.inputs.vocab_size
        if not all(0 <= t < vocab for t in req.tokens):
            raise bad_request(f"tokens must be integers in [0, {vocab})", "invalid_value", "tokens")
        return DetokenizeResponse(prompt=self.inputs.tokenizer.decode(req.tokens))

    # -- running ------------------------------------------------------------------------------------------
    async def chat(self, req: ChatCompletionRequest, is_disconnected) -> BaseModel | AsyncIterator[str]:
        return await self._serve(req, "chatcmpl", self._prepare_chat, _ChatFormat(self.token_texts), is_disconnected)

    async def completion(self, req: CompletionRequest, is_disconnected) -> BaseModel | AsyncIterator[str]:
        return await self._serve(req, "cmpl", self._prepare_completion, _CompletionFormat(self.token_texts),
                                 is_disconnected)

    async def classify(self, req: ClassificationRequest, is_disconnected) -> BaseModel:
        return await self._serve(req, "classify", self._prepare_classify, _ClassifyFormat(), is_disconnected)

    async def _serve(self, req: SamplingFields | ClassificationRequest, prefix: str, prepare, fmt: _Format,
                     is_disconnected) -> BaseModel | AsyncIterator[str]:
        arrival = time.time()
        lora = await self.resolve(req.model)
        prompts = 1 if getattr(req, "messages", None) is not None else len(req.prompts())
        admission = self.engine.admit(prompts * getattr(req, "n", 1))  # held from here, preprocessing included
        try:
            request_id = f"{prefix}-{uuid.uuid4().hex}"
            prepared = await asyncio.to_thread(prepare, req, request_id, lora)
            outputs = await self.engine.add(admission, prepared, arrival, None if req.stream else is_disconnected)
        except BaseException:
            admission.release()
            raise
        call = _Call(request_id, req.model or self.models.name, req, prepared, arrival, self.log_requests)
        if req.stream:
            return self._stream(call, outputs, fmt)
        return await self._collect(call, outputs, fmt)

    async def _collect(self, call: _Call, outputs: CallOutputs, fmt: _Format) -> BaseModel:
        finals: dict[int, RequestOutput] = {}
        try:
            async with aclosing(aiter(outputs)) as outs:
                async for i, out in outs:
                    if out.finished:
                        finals[i] = out
        except ClientDisconnectedError:
            self._aborted(call, finals.values())
            raise
        outs = [finals[i] for i in range(len(call.prepared))]
        call.log(outs)
        return fmt.response(call, outs)

    async def _stream(self, call: _Call, outputs: CallOutputs, fmt: _Format) -> AsyncIterator[str]:
        n = call.req.n
        params = call.prepared[0].params
        deltas = _TextDeltas(len(call.prepared) * n, params.stop if isinstance(params, SamplingParams) else [])
        finals: dict[int, RequestOutput] = {}
        opts = call.req.stream_options
        continuous = bool(opts and opts.continuous_usage_stats)
        latest: dict[int, RequestOutput] = {}  # per prompt, for continuous usage
        tokens_seen: dict[int, int] = {}
        tokens_sent: dict[int, int] = {}  # per choice: tokens whose logprobs went out
        wants_logprobs = getattr(call.req, "num_logprobs", None) is not None
        done = False
        first = fmt.first_chunk(call)
        try:
            if first is not None:
                yield _sse(first)
            async with aclosing(aiter(outputs)) as outs:
                async for i, out in outs:
                    choices = []
                    for c in out.outputs:
                        index = i * n + c.index
                        text, first_finish = deltas.next(index, c.text, c.finish_reason)
                        advanced = len(c.token_ids) > tokens_seen.get(index, 0)
                        tokens_seen[index] = len(c.token_ids)
                        if text or first_finish or ((continuous or wants_logprobs) and advanced):
                            sent = tokens_sent.get(index, 0)
                            tokens_sent[index] = len(c.token_ids)
                            choices.append(_Delta(index, text, c.finish_reason if first_finish else None,
                                                  c.stop_reason, c.head if first_finish else None,
                                                  c.token_ids[sent:], (c.logprobs or [])[sent:]))
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
            if isinstance(e, EngineDeadError):
                call.log(finals.values(), str(e))
                err = APIError(503, str(e), "engine_dead")
            else:
                logger.exception("stream %s failed", call.request_id)
                err = APIError(500, str(e), "internal_error")
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
            self.request_id, self.model, self.req.stream, sum(len(p.processed.token_ids) for p in self.prepared),
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


@dataclass
class _Delta:
    """What one streamed chunk says of one choice: its new text and tokens (with their logprobs, when asked)."""

    index: int
    text: str
    finish_reason: str | None
    stop_reason: str | int | None
    head: Any
    token_ids: list[int]
    logprobs: list[dict[int, float]]


class TokenTexts:
    """Token ids as the text OpenAI's logprobs show (each token decoded alone), memoised per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._text.get(token_id)
        if text is None:
            text = self._text[token_id] = self.tokenizer.decode([token_id])
        return text

    def chat(self, token_ids: list[int], entries: list[dict[int, float]], k: int) -> ChatLogprobs:
        content = []
        for tid, entry in zip(token_ids, entries):
            best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
            content.append(TokenLogprob(token=self(tid), logprob=entry[tid], bytes=list(self(tid).encode()),
                                        top_logprobs=[TopLogprob(token=self(t), logprob=v, bytes=list(self(t).encode()))
                                                      for t, v in best]))
        return ChatLogprobs(content=content)

    def completion(self, token_ids: list[int], entries: list[dict[int, float] | None], offset: int
                   ) -> CompletionLogprobs:
        """Entries of None (an echoed prompt's tokens) give null logprobs; offsets count from `offset`."""
        out = CompletionLogprobs()
        for tid, entry in zip(token_ids, entries):
            token = self(tid)
            out.tokens.append(token)
            out.text_offset.append(offset)
            offset += len(token)
            out.token_logprobs.append(None if entry is None else entry[tid])
            out.top_logprobs.append(None if entry is None else {self(t): v for t, v in entry.items()})
        return out


class _Format(Protocol):
    """How one endpoint spells its chunks and responses."""

    def first_chunk(self, call: _Call) -> BaseModel | None: ...

    def chunk(self, call: _Call, choices: list[_Delta], timings: RequestTimings | None) -> BaseModel: ...

    def usage_chunk(self, call: _Call, usage: Usage, timings: RequestTimings) -> BaseModel: ...

    def response(self, call: _Call, outs: list[RequestOutput]) -> BaseModel: ...


class _ChatFormat:
    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts

    def _logprobs(self, call, token_ids, entries) -> ChatLogprobs | None:
        k = getattr(call.req, "num_logprobs", None)
        return None if k is None else self.texts.chat(token_ids, entries, k)

    def first_chunk(self, call):
        choices = [ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                   for i in range(call.req.n)]
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=choices)

    def chunk(self, call, choices, timings):
        items = [ChatChunkChoice(index=d.index, delta=DeltaMessage(content=d.text), finish_reason=d.finish_reason,
                                 stop_reason=d.stop_reason, head=_head_result(d.head),
                                 logprobs=self._logprobs(call, d.token_ids, d.logprobs)) for d in choices]
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=items,
                                   metrics=timings)

    def usage_chunk(self, call, usage, timings):
        return ChatCompletionChunk(id=call.request_id, created=call.created, model=call.model, choices=[],
                                   usage=usage, metrics=timings)

    def response(self, call, outs):
        choices = [ChatChoice(index=c.index, message=ChatMessage(content=c.text), finish_reason=c.finish_reason,
                              stop_reason=c.stop_reason, head=_head_result(c.head),
                              logprobs=self._logprobs(call, c.token_ids, c.logprobs or []))
                   for c in outs[0].outputs]
        return ChatCompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=choices,
                                      usage=_usage(outs), metrics=_timings(outs))


class _CompletionFormat:
    """Completions; with `echo` each choice's text (and logprobs, as nulls) starts with its prompt."""

    def __init__(self, texts: TokenTexts) -> None:
        self.texts = texts
        self.offsets: dict[int, int] = {}  # streaming: text sent so far per choice (logprobs' text_offset)

    def _prompt_text(self, call, i: int) -> str:
        p = call.prepared[i]
        return p.text if p.text is not None else self.texts.tokenizer.decode(p.processed.token_ids)

    def _prompt_ids(self, call, i: int) -> list[int]:
        return call.prepared[i].processed.token_ids

    def first_chunk(self, call):
        if not call.req.echo:
            return None
        n = call.req.n
        items = []
        for i in range(len(call.prepared)):
            text = self._prompt_text(call, i)
            ids = self._prompt_ids(call, i)
            for j in range(n):
                logprobs = None
                if call.req.num_logprobs is not None:
                    logprobs = self.texts.completion(ids, [None] * len(ids), 0)
                items.append(CompletionChoice(index=i * n + j, text=text, finish_reason=None, logprobs=logprobs))
                self.offsets[i * n + j] = len(text)
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=items)

    def chunk(self, call, choices, timings):
        items = []
        for d in choices:
            logprobs = None
            if call.req.num_logprobs is not None:
                logprobs = self.texts.completion(d.token_ids, d.logprobs, self.offsets.get(d.index, 0))
            self.offsets[d.index] = self.offsets.get(d.index, 0) + len(d.text)
            items.append(CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason,
                                          stop_reason=d.stop_reason, logprobs=logprobs))
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=items,
                                  metrics=timings)

    def usage_chunk(self, call, usage, timings):
        return CompletionResponse(id=call.request_id, created=call.created, model=call.model, choices=[],
                                  usage=usage, metrics=timings)

    def response(self, call, outs):
        n = call.req.n
        choices = []
        for i, o in enumerate(outs):
            prefix = self._prompt_text(call, i) if call.req.echo else ""
            for c in o.outputs:
                logprobs = None
                if call.req.num_logprobs is not None:
                    ids, entries = list(c.token_ids), list(c.logprobs or [])
                    if call.req.echo:
                        prompt_ids = self._prompt_ids(call, i)
                        ids, entries = prompt_ids + ids, [None] * len(prompt_ids) + entries
                    logprobs = self.texts.completion(ids, entries, 0)
                choices.append(CompletionChoice(index=i * n + c.index, text=prefix + c.text,
                                                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                                                logprobs=logprobs))
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


def _token_keys(bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's `logit_bias` with its keys, token ids written as strings (as JSON keys are), made ints."""
    if bias is None:
        return None
    out = {}
    for key, value in bias.items():
        try:
            out[int(key)] = value
        except ValueError:
            raise ValueError(f"logit_bias keys must be token ids, got {key!r}") from None
    return out


def _refused(e: InputError, code: str, param: str) -> APIError:
    return bad_request(str(e), e.code or code, e.param or param)
