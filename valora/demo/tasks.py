"""The demo's visual tasks: each asks one question about a digit image and has one right answer per digit.

The base model is trained on `digit` only; every other task is taught by its own LoRA adapter, so the
base model, asked an adapter's question, still answers with the digit and gets the task wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@dataclass(frozen=True)
class Task:
    name: str  # also the adapter's name when served
    question: str
    answer: Callable[[int], str]
    summary: str

    def messages(self, image_url: str) -> list[dict]:
        """The OpenAI chat messages that ask this task about one image."""
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": self.question},
        ]}]


BASE_TASK = Task("digit", "What digit is this?", str, "name the digit")
ADAPTER_TASKS = (
    Task("parity", "Is the digit odd or even?", lambda d: "odd" if d % 2 else "even", "odd or even"),
    Task("plus-one", "What is the digit plus one?", lambda d: str(d + 1), "the digit plus one"),
    Task("spell", "Spell the digit as a word.", lambda d: NUMBER_WORDS[d], "the digit as a word"),
)
TASKS = (BASE_TASK, *ADAPTER_TASKS)


def corpus() -> list[str]:
    """Text the demo tokenizer is trained on, so questions and answers take few tokens."""
    answers = [t.answer(d) for t in TASKS for d in range(10)]
    return [t.question for t in TASKS] + answers + ["You are a helpful assistant.", "system user assistant"]
