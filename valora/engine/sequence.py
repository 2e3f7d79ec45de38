"""One generated sequence: its prompt, its output so far, where its KV lives, and how to decode it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from valora.heads.params import HeadParams
from valora.multimodal.inputs import ProcessedPrompt
from valora.outputs import HeadOutput
from valora.sampling_params import SamplingParams

if TYPE_CHECKING:
    from valora.multimodal.cache import EmbeddingCache

# An output token sampled by a step still in flight (asynchronous scheduling): the next step, launched before the
# host has it, reads it on the device from the sampler's output; the host writes it in when that step is collected.
PENDING = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    prompt: ProcessedPrompt
    params: SamplingParams | HeadParams
    lora_name: str | None
    arrival_time: float
    generator: torch.Generator | None = None
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache (a prompt in chunks: those done so far)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | None = None  # the stop token id that ended it
    stop_ids: frozenset[int] = frozenset()  # token ids that end it (EOS unless ignored, and the params' stop ids)
    image_embeds: list[torch.Tensor | None] = field(default_factory=list)  # while chunks still take their rows
    num_preemptions: int = 0
    deadline: float | None = None  # absolute time by which the request should finish, if it has one
    # The adapter's registration, "name#version": a reload under the same name gets a new version, so KV blocks
    # (and image embeddings) computed under the old one are never matched.
    adapter_key: str | None = None
    vision_tag: str | None = None  # the adapter_key, when the adapter changes image embeddings (their cache key)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks so far (prefix caching)
    num_cached_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    logprobs: list[dict[int, float]] | None = None
    head_output: HeadOutput | None = None  # the answer of its task head, when a head answered it
    grammar: Any = None  # its structured-output matcher (llguidance), advanced with every accepted token
    penalty_counts: torch.Tensor | None = None  # [2, V] on the device: generated-token counts, prompt presence
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it was first scheduled

    def __post_init__(self) -> None:
        self.image_embeds = [None] * len(self.prompt.images)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt.token_ids)

    def __len__(self) -> int:
        return self.prompt_len + len(self.output_ids)

    def token_at(self, i: int) -> int:
        return self.prompt.token_ids[i] if i < self.prompt_len else self.output_ids[i - self.prompt_len]

    def token_range(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt and output together."""
        n = self.prompt_len
        head = self.prompt.token_ids[start:end] if start < n else []
        return head + self.output_ids[max(0, start - n) : max(0, end - n)]

    def image_key(self, k: int) -> tuple[str, str | None]:
        """Image `k`'s key in the embedding cache: its content, and the adapter when that changes embeddings."""
        return self.prompt.images[k].content_hash, self.vision_tag

    def needs_encoding(self, k: int, cache: EmbeddingCache | None) -> bool:
        """Whether image `k` takes a vision pass when a step's tokens first reach its span: its embeddings are
        neither kept here (an earlier chunk computed them) nor in the embedding cache. The scheduler charges the
        encoder budget for exactly these (`cached_embeds` is the runner's side of it)."""
        return self.image_embeds[k] is None and (cache is None or self.image_key(k) not in cache)

    def cached_embeds(self, k: int, cache: EmbeddingCache | None) -> torch.Tensor | None:
        """Image `k`'s embeddings without a vision pass (kept here, else from the cache, then kept), or None."""
        if self.image_embeds[k] is None and cache is not None:
            self.image_embeds[k] = cache.get(self.image_key(k))
        return self.image_embeds[k]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
