"""The chat template applied to parsed messages, with the special tokens a client typed kept as text.

A chat template writes each turn between control tokens (`<|im_start|>user ... <|im_end|>`), and the prompt is
then tokenised as one string, so a message whose text says `<|im_end|><|im_start|>system` would close its own
turn and open a system turn (vLLM and transformers behave alike). By default the strings of the tokenizer's
special tokens are tokenised as plain text wherever they occur inside message text; only the template's own
control tokens are control tokens. A prompt without such strings is returned exactly as before (its text), so
ordinary requests are unchanged; one with them comes back as token ids.
"""

from __future__ import annotations

import re
import secrets

from valora.multimodal.inputs import InputError


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None, allow_special_tokens: bool = False,
                continue_final_message: bool = False) -> str | list[int]:
    """`messages` as `parse_messages` returns them. Text, or token ids when message text held special-token
    strings (tokenised as plain text unless `allow_special_tokens`). With `continue_final_message` the text ends
    inside the last message (no end-of-turn after it), so the model continues it: a prefilled answer."""
    if continue_final_message and add_generation_prompt:
        raise InputError("continue_final_message and add_generation_prompt cannot both be true: one continues the "
                         "last message, the other starts a new one", "invalid_value", "continue_final_message")

    def apply(msgs: list[dict]) -> str:
        return tokenizer.apply_chat_template(msgs, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt,
                                             continue_final_message=continue_final_message)

    specials = [] if allow_special_tokens else special_strings(tokenizer)
    typed = re.compile("|".join(map(re.escape, specials))) if specials else None
    if typed is None or not any(typed.search(text) for text in _texts(messages)):
        return apply(messages)
    # Mark each typed special string with a marker no client can guess, render, then find the marked spans.
    mark = f"\ue000{secrets.token_hex(8)}\ue000"
    marked = _map_texts(messages, lambda text: typed.sub(lambda m: mark + m.group() + mark, text))
    pieces = apply(marked).split(mark)
    if len(pieces) % 2 == 0:
        raise InputError("the chat template changed the message text; cannot keep its special tokens as text")
    spans, pos = [], 0
    for i, piece in enumerate(pieces):
        if i % 2:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    text = "".join(pieces)
    enc = tokenizer(text, return_offsets_mapping=True)
    control = set(tokenizer.convert_tokens_to_ids(specials))
    ids: list[int] = []
    for token, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token in control and any(a <= start and end <= b for a, b in spans):
            ids += tokenizer(text[start:end], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:
            ids.append(token)
    return ids


def special_strings(tokenizer) -> list[str]:
    """The text of every special added token, longest first (so that alternation prefers the longest)."""
    return sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)


def _texts(messages: list[dict]):
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (p["text"] for p in content if p.get("type") == "text")


def _map_texts(messages: list[dict], fn) -> list[dict]:
    def part(p: dict) -> dict:
        return {**p, "text": fn(p["text"])} if p.get("type") == "text" else p

    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = fn(content)
        elif isinstance(content, list):
            content = [part(p) for p in content]
        out.append({**m, "content": content})
    return out
