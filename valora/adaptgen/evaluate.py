"""Accuracy as served: every example goes through VaLoRA's own engine, the adapter loaded from its directory,
text tasks decoded greedily and head tasks answered by their head after the prefill. So the numbers a build
reports are what `valora serve` gives for the same adapter, not what the training framework computes."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from valora.adaptgen.tasks import Task
from valora.heads.params import HeadParams
from valora.lora.request import LoRARequest
from valora.sampling_params import SamplingParams


@dataclass(frozen=True)
class Score:
    accuracy: float
    n: int
    mean_iou: float | None = None  # box tasks

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "n": self.n, "mean_iou": self.mean_iou}


class Evaluator:
    """One engine over the base model for a whole build; adapters come and go by name."""

    def __init__(self, base_dir: Path, max_loras: int = 1, max_num_seqs: int = 256) -> None:
        from valora.llm import LLM

        self.llm = LLM(str(base_dir), enable_lora=True, max_loras=max_loras, max_num_seqs=max_num_seqs)
        self.tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count(1)

    def prompt(self, task: Task, image) -> dict:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": task.question}]}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return {"prompt": text, "multi_modal_data": {"image": [image]}}

    def text_params(self, task: Task) -> SamplingParams:
        """Greedy, with room for the longest right answer, its end-of-turn token and one more."""
        targets = task.data.splits["test"].targets
        longest = max(len(self.tokenizer(task.answer_text(t), add_special_tokens=False)["input_ids"])
                      for t in (targets if task.data.is_box else range(len(task.data.labels))))
        return SamplingParams(temperature=0, max_tokens=longest + 2)

    def evaluate(self, adapter: Path | None, tasks: Sequence[Task], split: str,
                 limit: int | None = None) -> dict[str, Score]:
        """Scores per task on `split` (its first `limit` examples). Without an adapter the base model is asked,
        in text, every task, head tasks included: what a user of the base model alone would get."""
        lora = None
        if adapter is not None:
            n = next(self._ids)
            lora = LoRARequest(f"eval-{n}", n, str(adapter))
        prompts, params, owners = [], [], []
        for task in tasks:
            examples = task.data.splits[split]
            count = len(examples) if limit is None else min(limit, len(examples))
            p = HeadParams(task.name) if task.by_head and lora is not None else self.text_params(task)
            prompts += [self.prompt(task, examples.images[i]) for i in range(count)]
            params += [p] * count
            owners += [(task, examples.targets[i]) for i in range(count)]
        try:
            outs = self.llm.generate(prompts, params, lora, use_tqdm=False)
        finally:
            if lora is not None:
                self.llm.engine.core.remove_lora(lora.lora_name)
        marks: dict[str, list[tuple[bool, float | None]]] = {t.name: [] for t in tasks}
        for (task, target), out in zip(owners, outs):
            c = out.outputs[0]
            marks[task.name].append(task.score(c.head if c.head is not None else c.text, target))
        scores = {}
        for name, m in marks.items():
            ious = [v for _, v in m if v is not None]
            scores[name] = Score(sum(ok for ok, _ in m) / len(m), len(m), sum(ious) / len(ious) if ious else None)
        return scores
