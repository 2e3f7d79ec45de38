"""Train one adapter on a set of tasks: a PEFT LoRA over the frozen base plus a head per head task, together.

A batch splits its rows evenly over the adapter's tasks. Text tasks train the LM on the answer tokens; head tasks
train their head (and, through it, the LoRA) on the final hidden state at the prompt's last token, exactly the
state the engine hands a head when serving. A run may start from an adapter already trained on some of the tasks
(the greedy builder adds one task at a time), and is deterministic: weights and batches come from `train.seed`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from valora.adaptgen.tasks import Task
from valora.heads.artifact import load_heads, save_heads
from valora.heads.boxes import box_loss
from valora.heads.losses import classify_loss
from valora.heads.modules import TaskHead, pool_last
from valora.training.encoder import IGNORE, ChatEncoder, EncodedImage, Row
from valora.training.loop import fit
from valora.training.specs import AdapterSpec


@dataclass(frozen=True)
class Pick:
    task: Task
    index: int  # into the task's training examples


class AdapterModel(nn.Module):
    def __init__(self, base: nn.Module, spec: AdapterSpec, tasks: Sequence[Task], head_width: int,
                 start: Path | None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        super().__init__()
        torch.manual_seed(spec.train.seed)
        if start is None:
            config = LoraConfig(r=spec.r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                target_modules=spec.target_modules)
            self.peft = get_peft_model(copy.deepcopy(base), config)
        else:
            self.peft = PeftModel.from_pretrained(copy.deepcopy(base), start, is_trainable=True)
        hf = self.peft.base_model.model
        self.core, self.lm_head = hf.model, hf.lm_head
        hidden = hf.config.text_config.hidden_size
        known = load_heads("start", start, hidden) if start is not None else None
        heads = {}
        for t in tasks:
            if t.by_head:
                heads[t.name] = known.heads[t.name] if known and t.name in known.heads else TaskHead(
                    t.head_config(hidden, head_width))
        self.heads = nn.ModuleDict(heads).requires_grad_(True)
        self.only_heads = all(t.by_head for t in tasks)

    def loss(self, batch: dict[str, torch.Tensor], picks: Sequence[Pick]) -> torch.Tensor:
        labels = batch.pop("labels")
        hidden = self.core(**batch).last_hidden_state
        rows = len(picks)
        total = hidden.new_zeros(())
        text = [i for i, p in enumerate(picks) if not p.task.by_head]
        if text:
            logits = self.lm_head(hidden[text, :-1]).float()
            target = labels[text, 1:]
            per_token = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
            total = total + (per_token.sum(-1) / (target != IGNORE).sum(-1)).sum()
        for name, head in self.heads.items():
            idx = [i for i, p in enumerate(picks) if p.task.name == name]
            if not idx:
                continue
            out = head(pool_last(hidden[idx], batch["attention_mask"][idx]))
            examples = picks[idx[0]].task.data.splits["train"]
            targets = [examples.targets[picks[i].index] for i in idx]
            if head.config.kind == "box":
                loss = box_loss(out.float(), torch.tensor(targets, dtype=torch.float32))
            else:
                soft = None if examples.soft is None else torch.from_numpy(
                    examples.soft[[picks[i].index for i in idx]])
                loss = classify_loss(out.float(), torch.tensor(targets), soft)
            total = total + loss * len(idx)
        return total / rows

    def save(self, out_dir: Path) -> None:
        self.peft.save_pretrained(out_dir)
        if len(self.heads):  # a chat gets a head's answer by default only where no task is answered in text
            default = next(iter(self.heads)) if len(self.heads) == 1 and self.only_heads else None
            save_heads(out_dir, dict(self.heads), default=default)


class TaskInputs:
    """The encoder and each task's training images, processed once and shared by every run of a build."""

    def __init__(self, base_dir: Path) -> None:
        self.encoder = ChatEncoder(base_dir)
        self._images: dict[str, list[EncodedImage]] = {}

    def images(self, task: Task) -> list[EncodedImage]:
        if task.name not in self._images:
            self._images[task.name] = self.encoder.images(task.data.splits["train"].images)
        return self._images[task.name]

    def sample(self, tasks: Sequence[Task], batch_size: int, gen: torch.Generator) -> tuple[dict, list[Pick]]:
        offset = int(torch.randint(len(tasks), (1,), generator=gen))
        picks = []
        for i in range(batch_size):
            task = tasks[(i + offset) % len(tasks)]
            picks.append(Pick(task, int(torch.randint(len(task.data.splits["train"]), (1,), generator=gen))))
        rows = [self._row(p) for p in picks]
        return self.encoder.batch(rows), picks

    def _row(self, pick: Pick) -> Row:
        task = pick.task
        answer = None if task.by_head else task.answer_text(task.data.splits["train"].targets[pick.index])
        return self.encoder.row(task.question, self.images(task)[pick.index], answer)


def train_adapter(base: nn.Module, inputs: TaskInputs, tasks: Sequence[Task], spec: AdapterSpec, head_width: int,
                  out_dir: Path, start: Path | None = None, desc: str = "adapter") -> Path:
    """Train on `tasks` (from the adapter at `start`, if given) and save the PEFT adapter and heads to `out_dir`."""
    model = AdapterModel(base, spec, tasks, head_width, start)

    def loss_of(gen: torch.Generator) -> torch.Tensor:
        batch, picks = inputs.sample(tasks, spec.train.batch_size, gen)
        return model.loss(batch, picks)

    fit(model, loss_of, spec.train, desc)
    model.save(out_dir)
    return out_dir
