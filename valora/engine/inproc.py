"""`InprocEngine`: the whole engine inside the caller's process, for the offline `LLM` and for callers that drive
their own loop: input processor -> engine core (`LLMEngine`) -> output processor, the same three pieces the
server runs, without the process boundary between them.

    engine = InprocEngine(EngineConfig(model=...))
    engine.add_request("r1", {"prompt": "...", "multi_modal_data": {"image": img}}, SamplingParams(max_tokens=8))
    while engine.has_unfinished_requests():
        for out in engine.step(): ...

Adapters named by a request are loaded on first use (vLLM's offline behaviour); `core` is the engine core, for
adapter management, stats and inspection.
"""

from __future__ import annotations

from collections.abc import Iterable

from valora.config import EngineConfig
from valora.engine.input_processor import InputProcessor, PromptType
from valora.engine.llm_engine import LLMEngine
from valora.engine.output_processor import OutputProcessor
from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.multimodal.inputs import ProcessedPrompt
from valora.outputs import RequestOutput
from valora.sampling_params import SamplingParams

_STALL_WAIT_S = 0.05  # longest a stalled step waits for a reload, so a caller's loop stays responsive


class InprocEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.core = LLMEngine(config)
        self.input_processor = InputProcessor(config, self.core.max_model_len)
        self.output_processor = OutputProcessor(self.input_processor.tokenizer)

    @property
    def tokenizer(self):
        return self.input_processor.tokenizer

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | HeadParams | None = None,
                    lora_request: LoRARequest | None = None, arrival_time: float | None = None,
                    deadline_s: float | None = None) -> None:
        """Process and queue a request; a bad one raises `InputError` (or `AdapterError`) and leaves no trace."""
        if lora_request is not None:
            self.core.add_lora(lora_request)
        self.add_processed(request_id, *self.input_processor.process(prompt), params, lora_request, arrival_time,
                           deadline_s)

    def add_processed(self, request_id: str, text: str | None, processed: ProcessedPrompt,
                      params: SamplingParams | HeadParams | None = None, lora_request: LoRARequest | None = None,
                      arrival_time: float | None = None, deadline_s: float | None = None) -> None:
        """`add_request` for a prompt `input_processor.process` made ready (its adapter loaded already)."""
        if request_id in self.output_processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        self.input_processor.check_params(params)
        now = arrival_time if arrival_time is not None else self.core.clock()
        reqs = self.input_processor.core_requests(request_id, processed, params, lora_request, now, deadline_s)
        self.output_processor.add_request(request_id, text, processed.token_ids, params,
                                          lora_request.lora_name if lora_request else None, now)
        try:
            for req in reqs:
                self.core.add_request(req)
        except Exception:
            self.abort_request(request_id)
            raise

    def step(self) -> list[RequestOutput]:
        """One engine step's outputs: every request that got tokens, with its text so far."""
        processed = self.output_processor.process_outputs(self.core.step(), self.core.clock())
        self.core.abort_request(processed.reqs_to_abort)
        if self.core.stalled:  # waiting for adapters to reload: don't spin the caller's loop meanwhile
            self.core.wait_for_adapters(_STALL_WAIT_S)
        return processed.request_outputs

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.core.abort_request(self.output_processor.abort_request(rid))

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished_requests()
