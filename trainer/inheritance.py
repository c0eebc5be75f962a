"""LiT weight inheritance: a linear-attention student takes every teacher weight except its linear attention."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from trainer.models.attention import LinearAttention

logger = logging.getLogger(__name__)


def linear_attention_weights(model: nn.Module) -> set[str]:
    """State-dict names inside the model's linear-attention modules: the part a linear student learns afresh.

    Softmax attention (anchors, refiners) and cross-attention compute what the teacher's did and are inherited.
    """
    prefixes = [f"{name}." for name, module in model.named_modules() if isinstance(module, LinearAttention)]
    return {name for name in model.state_dict() if any(name.startswith(prefix) for prefix in prefixes)}


@dataclass
class InheritanceReport:
    """Which student weights came from the teacher, and why the others did not."""

    loaded: list[str] = field(default_factory=list)
    skipped_linear_attention: list[str] = field(default_factory=list)
    missing_in_teacher: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)
    unused_teacher: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """Counts, then every tensor that did not come from the teacher, by name (the loaded ones are the rest)."""
        lines = [f"inherited {len(self.loaded)} tensors; kept fresh: {len(self.skipped_linear_attention)} linear "
                 f"attention, {len(self.missing_in_teacher)} absent from teacher, {len(self.shape_mismatch)} "
                 f"shape-mismatched; {len(self.unused_teacher)} teacher tensors unused"]
        for label, names in (("fresh (linear attention)", self.skipped_linear_attention),
                             ("fresh (absent from teacher)", self.missing_in_teacher),
                             ("fresh (shape mismatch)", self.shape_mismatch),
                             ("teacher tensors unused", self.unused_teacher)):
            if names:
                lines.append(f"  {label}: {', '.join(names)}")
        return "\n".join(lines)


def inherit_weights(student: nn.Module, teacher_state: dict[str, torch.Tensor]) -> InheritanceReport:
    """Copy every teacher tensor whose name and shape match into `student`, except its linear-attention weights."""
    report = InheritanceReport()
    fresh = linear_attention_weights(student)
    update = {}
    for name, tensor in student.state_dict().items():
        if name in fresh:
            report.skipped_linear_attention.append(name)
        elif name not in teacher_state:
            report.missing_in_teacher.append(name)
        elif teacher_state[name].shape != tensor.shape:
            report.shape_mismatch.append(name)
        else:
            update[name] = teacher_state[name]
            report.loaded.append(name)
    report.unused_teacher = sorted(set(teacher_state) - set(update))
    student.load_state_dict(update, strict=False)
    logger.info("weight inheritance: %s", report.summary())
    return report
