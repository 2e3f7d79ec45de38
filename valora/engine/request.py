"""What crosses between the front end and the engine core: ready requests in, per-step token deltas out.

The front end (input processor) does all prompt work before a request reaches the core; the core only schedules
and runs the model, and reports each step's new tokens; the front end (output processor) turns them into text.
Both types are plain data, so they cross a process boundary as they are (tensors travel as out-of-band buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.multimodal.inputs import ProcessedPrompt
from valora.outputs import HeadOutput
from valora.sampling_params import SamplingParams


@dataclass
class EngineCoreRequest:
    """One sequence to generate (the core never sees n > 1: the front end fans a request out into children)."""

    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams | HeadParams
    lora: LoRARequest | None
    arrival_time: float
    stop_token_ids: frozenset[int]  # the ids that end it: EOS (unless ignore_eos) and the params' stop ids
    deadline_s: float | None = None  # seconds after arrival by which it should finish (the valora policy)


@dataclass
class EngineCoreOutput:
    """What one step did to one request: its new tokens, and how it ended if it did. Ends decided by a token
    alone (stop ids, max_tokens, the context length, a head's answer) are the core's; stop strings are the
    front end's, which then aborts the request in the core."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | None = None  # the stop token id that ended it
    head: HeadOutput | None = None
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when it was first scheduled
    error: str | None = None  # why the core ended it, when that is not the request's own doing

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
