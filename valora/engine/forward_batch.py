"""What one model step needs, built once per step by the model runner and shared by every layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from valora.lora.batch import LoRABatch


@dataclass
class AttentionMeta:
    """Where each new token's K/V goes and which cached keys every query reads, in block-table form.

    Device tensors feed the kernels (and can be copied into static CUDA-graph buffers); the host ints are what the
    PyTorch path and the kernel launch grids need. A sequence's key i sits in KV slot
    `block_table[i // block_size] * block_size + i % block_size`; table rows are padded with block 0.
    """

    slot_mapping: torch.Tensor  # [T] int64: KV slot of each new token (pad rows: any slot the runner reserves)
    block_size: int
    # Sequences with several new tokens (prefill, recompute after preemption, chunks): queries are batch rows
    # [q_start, q_start + q_len) and sit at the LAST q_len positions of a context of context_len keys.
    prefill_q_starts: torch.Tensor | None = None  # [Sp] int32
    prefill_q_lens: torch.Tensor | None = None  # [Sp] int32
    prefill_context_lens: torch.Tensor | None = None  # [Sp] int32
    prefill_block_tables: torch.Tensor | None = None  # [Sp, max_blocks] int32
    prefill_host: tuple[tuple[int, int, int], ...] = ()  # (q_start, q_len, context_len) per prefill
    # Single-token decodes.
    decode_rows: torch.Tensor | None = None  # [Bd] int64 rows of the batch
    decode_context_lens: torch.Tensor | None = None  # [Bd] int32 (0: padding row, its output is 0)
    decode_block_tables: torch.Tensor | None = None  # [Bd, max_blocks] int32
    decode_max_context: int = 0  # host: the longest decode context

    @property
    def prefill_max_q_len(self) -> int:
        return max((q for _, q, _ in self.prefill_host), default=0)


@dataclass
class ImageInputs:
    """New images of this step, in the order their placeholder tokens appear in the flat batch."""

    data: list[dict[str, torch.Tensor]]  # per image: the processor's tensors (pixel_values, image_grid_thw, ...)
    num_tokens: list[int]  # placeholder tokens per image
    lora_slots: list[int]  # adapter slot of the request that owns each image (-1: none)
    merged_slot: int | None  # the adapter folded into the weights this step, if any
    token_rows: torch.Tensor  # [sum num_tokens] rows of the batch that receive image embeddings
    cached: list[torch.Tensor | None]  # embeddings already computed for an image (recompute after preemption)


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [3, T] (M-RoPE) or [T]
    attn: AttentionMeta
    logits_rows: torch.Tensor  # [B] last row of each sequence that samples this step
    lora: LoRABatch | None = None
    images: ImageInputs | None = None
    # What `lora` is built from, on the host: each row's adapter slot (-1: none) and the merged adapter's slot.
    # A CUDA-graph replay refills its static LoRA metadata from these instead.
    lora_slots: list[int] = field(default_factory=list)
    merged_slot: int | None = None

    def build_lora(self) -> None:
        self.lora = LoRABatch.build(self.lora_slots, self.merged_slot, self.input_ids.device)
