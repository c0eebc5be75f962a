"""AdamW with linear warmup then cosine decay to a floor (the DESIGN.md recipe)."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimizerConfig


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear ramp over `warmup_steps`, then a half cosine from 1 to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and convolutions; never biases, norms or 1-d gains.

    Frozen parameters are in the groups too (AdamW skips a parameter without a gradient), so the optimizer state of
    a run with a frozen part (Hi-DiT's stage 1) loads into the run that trains it (stage 2).
    """
    decay, no_decay = [], []
    for param in model.parameters():
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (fused kernels when the weights live on CUDA) and its per-step warmup + cosine schedule."""
    on_cuda = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay),
        lr=config.lr,
        betas=config.betas,
        eps=config.eps,
        fused=True if on_cuda else None,
    )
    warmup_steps = round(config.warmup_fraction * total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, config.min_lr_ratio)
    )
    return optimizer, schedule
