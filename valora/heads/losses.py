"""Classification loss, with knowledge distillation from a teacher's class probabilities when there is one."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classify_loss(logits: torch.Tensor, target: torch.Tensor, teacher: torch.Tensor | None = None,
                  alpha: float = 0.5, temperature: float = 2.0) -> torch.Tensor:
    """Cross-entropy on `target`; with `teacher` ([B, C] probabilities), Hinton et al.'s distillation:
    (1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T), both distributions softened by temperature T.
    (The paper's released code applied softmax twice and no temperature; this is the textbook form.)"""
    ce = F.cross_entropy(logits, target)
    if teacher is None:
        return ce
    log_teacher = F.log_softmax(teacher.clamp(min=1e-8).log() / temperature, dim=-1)
    kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), log_teacher, log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * temperature**2 * kd
