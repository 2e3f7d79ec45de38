"""`OutputProcessor`: the core's per-step token deltas -> `RequestOutput`s, on the front end's side.

It detokenises incrementally, finds stop strings, gathers logprobs and a request's `n` completions (the core ran
each as its own request) into one `RequestOutput`. A stop string ends a completion here: its core request is
returned in `reqs_to_abort`, and tokens the core made for it meanwhile are dropped (it is found one step late or
more; the text is cut where the stop string starts, as before).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from valora.engine.detokenizer import IncrementalDetokenizer
from valora.engine.input_processor import child_id
from valora.engine.request import EngineCoreOutput
from valora.heads.params import HeadParams
from valora.outputs import CompletionOutput, HeadOutput, RequestMetrics, RequestOutput
from valora.sampling_params import SamplingParams


@dataclass
class _Completion:
    index: int
    detok: IncrementalDetokenizer | None  # None: a head answers
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    head: HeadOutput | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams | HeadParams
    lora_name: str | None
    metrics: RequestMetrics
    completions: list[_Completion]
    num_cached_tokens: int | None = None  # prompt tokens the prefix cache held (its first completion's)

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.completions)

    def output(self) -> RequestOutput:
        outs = [CompletionOutput(c.index, c.text, list(c.token_ids), c.finish_reason, c.stop_reason,
                                 list(c.logprobs) if c.logprobs is not None else None, c.head)
                for c in self.completions]
        out = RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outs, self.finished, self.lora_name,
                            self.metrics, self.num_cached_tokens or 0)
        errors = [c.error for c in self.completions if c.error]
        if errors:
            out.extra["error"] = errors[0]
        return out


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]  # one per request that changed, its text so far (cumulative)
    reqs_to_abort: list[str]  # core request ids that ended on a stop string


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}
        self._children: dict[str, tuple[_Request, _Completion]] = {}  # core request id -> its completion

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams | HeadParams, lora_name: str | None, arrival_time: float) -> None:
        by_head = isinstance(params, HeadParams)
        n = 1 if by_head else params.n
        completions = [_Completion(i, None if by_head else IncrementalDetokenizer(self.tokenizer,
                                                                                  params.skip_special_tokens))
                       for i in range(n)]
        req = _Request(request_id, prompt, prompt_token_ids, params, lora_name, RequestMetrics(arrival_time),
                       completions)
        self.requests[request_id] = req
        for c in completions:
            self._children[child_id(request_id, c.index)] = (req, c)

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; the core request ids still to abort."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return []
        ids = [child_id(request_id, c.index) for c in req.completions]
        for cid in ids:
            self._children.pop(cid, None)
        return [cid for cid, c in zip(ids, req.completions) if not c.finished]

    def process_outputs(self, outputs: list[EngineCoreOutput], now: float) -> ProcessedOutputs:
        touched: dict[str, _Request] = {}
        to_abort: list[str] = []
        for out in outputs:
            found = self._children.get(out.request_id)
            if found is None:  # aborted meanwhile
                continue
            req, comp = found
            if comp.finished:  # ended on a stop string: what the core made since is dropped
                continue
            m = req.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = out.first_scheduled_time
            if m.first_token_time is None:
                m.first_token_time = out.first_token_time
            if req.num_cached_tokens is None:
                req.num_cached_tokens = out.num_cached_tokens
            self._apply(comp, req.params, out)
            if comp.finished and not out.finished:
                to_abort.append(out.request_id)
            touched[req.request_id] = req
        results = []
        for req in touched.values():
            if req.finished:
                req.metrics.finished_time = now
                self.abort_request(req.request_id)
            results.append(req.output())
        return ProcessedOutputs(results, to_abort)

    def _apply(self, comp: _Completion, params: SamplingParams | HeadParams, out: EngineCoreOutput) -> None:
        comp.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            comp.logprobs = (comp.logprobs or []) + out.new_logprobs
        comp.finish_reason, comp.stop_reason, comp.error = out.finish_reason, out.stop_reason, out.error
        if out.head is not None:
            comp.head, comp.text = out.head, out.head.label
        if comp.detok is None or not out.new_token_ids and not out.finished:
            return
        prev = len(comp.text)
        comp.text += comp.detok.step(comp.token_ids, final=comp.finished)
        if params.stop and len(comp.token_ids) >= params.min_tokens and comp.finish_reason != "abort":
            longest = max(len(s) for s in params.stop)
            window_start = max(0, prev - longest + 1)
            hits = [(comp.text.find(s, window_start), s) for s in params.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                comp.text = comp.text[: i + len(s) if params.include_stop_str_in_output else i]
                comp.finish_reason, comp.stop_reason = "stop", s
