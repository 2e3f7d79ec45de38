"""A task ready to train and score: its spec, its generated data, its question, and how an answer is judged.

Scoring is the same for every way of answering: a class task is right when the answer equals the true label;
a box task is right when the box (a head's, or one parsed from generated text) overlaps the truth with IoU >= 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

from valora.adaptgen.datasets import TaskData, generate
from valora.adaptgen.spec import TaskSpec
from valora.adaptgen.teachers import TeacherReport, apply_teacher
from valora.heads.boxes import format_box, iou, parse_box
from valora.heads.modules import HeadConfig
from valora.outputs import HeadOutput

IOU_HIT = 0.5


@dataclass
class Task:
    spec: TaskSpec
    data: TaskData
    teacher: TeacherReport | None = None

    @classmethod
    def load(cls, spec: TaskSpec, image_size: int) -> Task:
        data = generate(spec.dataset, image_size, spec.seed, spec.options)
        report = None
        if spec.teacher is not None:
            if data.is_box:
                raise ValueError(f"task {spec.name!r}: a teacher labels classes, not boxes")
            data.splits["train"], report = apply_teacher(spec.teacher, data.splits["train"], len(data.labels),
                                                         spec.seed)
        return cls(spec, data, report)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def by_head(self) -> bool:
        return self.spec.answer == "head"

    @property
    def question(self) -> str:
        return self.spec.prompt.replace("{labels}", " or ".join(self.data.labels or ()))

    def answer_text(self, target) -> str:
        """The text a model should reply with."""
        return format_box(target) if self.data.is_box else self.data.labels[target]

    def head_config(self, hidden_size: int, width: int) -> HeadConfig:
        kind = "box" if self.data.is_box else "classify"
        return HeadConfig(self.name, kind, hidden_size, width, () if self.data.is_box else self.data.labels)

    def score(self, answer: str | HeadOutput, target) -> tuple[bool, float | None]:
        """(right or not, IoU for box tasks)."""
        if self.data.is_box:
            box = answer.box if isinstance(answer, HeadOutput) else parse_box(answer)
            overlap = iou(box, target)
            return overlap >= IOU_HIT, overlap
        text = answer.label if isinstance(answer, HeadOutput) else answer.strip()
        return text == self.data.labels[target], None
