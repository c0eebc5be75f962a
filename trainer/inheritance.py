"""LiT weight inheritance: a linear-attention student takes every teacher weight except the attention."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)


def is_attention_weight(name: str) -> bool:
    """Self-attention parameters (`blocks.N.attn.*`): the part a linear student learns afresh."""
    return ".attn." in f".{name}"


@dataclass
class InheritanceReport:
    """Which student weights came from the teacher, and why the others did not."""

    loaded: list[str] = field(default_factory=list)
    skipped_attention: list[str] = field(default_factory=list)
    missing_in_teacher: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    unused_teacher: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"inherited {len(self.loaded)} tensors; kept fresh: {len(self.skipped_attention)} attention, "
                f"{len(self.missing_in_teacher)} absent from teacher, {len(self.shape_mismatch)} shape-mismatched; "
                f"{len(self.unused_teacher)} teacher tensors unused")


def inherit_weights(student: nn.Module, teacher_state: dict[str, torch.Tensor]) -> InheritanceReport:
    """Copy every teacher tensor whose name and shape match into `student`, except attention weights."""
    report = InheritanceReport()
    student_state = student.state_dict()
    update = {}
    for name, tensor in student_state.items():
        if is_attention_weight(name):
            report.skipped_attention.append(name)
        elif name not in teacher_state:
            report.missing_in_teacher.append(name)
        elif teacher_state[name].shape != tensor.shape:
            report.shape_mismatch.append(name)
        else:
            update[name] = teacher_state[name]
            report.loaded.append(name)
    report.unused_teacher = sorted(set(teacher_state) - set(update))
    student.load_state_dict(update, strict=False)
    logger.info(report.summary())
    return report
