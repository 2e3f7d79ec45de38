"""Incremental detokenisation: each step decodes a short window, and holds back bytes of an incomplete
character (the replacement char) until the next token completes it."""

from __future__ import annotations

from collections.abc import Sequence


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def step(self, ids: Sequence[int], final: bool = False) -> str:
        """New text since the last call, given all output ids so far."""
        prefix = self._decode(ids[self.prefix_offset : self.read_offset])
        text = self._decode(ids[self.prefix_offset :])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return text[len(prefix) :]
        return ""
