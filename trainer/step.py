"""One optimisation step: the loss terms as functions (flow matching, distillation), then backward, clip, AdamW, EMA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trainer.config import Precision, TrainJobConfig
from trainer.ema import EMA
from trainer.flow_matching import NoisedBatch, noise_batch, velocity_mse, weighted_mean
from trainer.precision import autocast


def flow_matching_term(prediction: torch.Tensor, noised: NoisedBatch, weights: torch.Tensor) -> torch.Tensor:
    """Rectified flow: the weighted MSE between the predicted velocity and `ε - x0`."""
    return weighted_mean(velocity_mse(prediction, noised.target), weights)


def distillation_term(prediction: torch.Tensor, teacher: nn.Module, noised: NoisedBatch,
                      weights: torch.Tensor) -> torch.Tensor:
    """LiT distillation: the weighted MSE between the student's velocity and a frozen teacher's at the same x_t, t."""
    with torch.no_grad():
        target = teacher(noised.x_t, noised.t, noised.text, noised.text_mask)
    return weighted_mean(velocity_mse(prediction, target), weights)


@dataclass
class Objective:
    """The loss of a run: flow matching with CFG dropout, plus `distill_lambda` x distillation when a teacher is set."""

    config: TrainJobConfig
    null_text: torch.Tensor | None
    teacher: nn.Module | None = None

    def loss(self, network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        weights = batch["weights"]
        noised = noise_batch(batch["latent"], batch["text"], batch["text_mask"], sampling=self.config.timesteps,
                             null_text=self.null_text, cfg_dropout=self.config.cfg_dropout, generator=generator)
        prediction = network(noised.x_t, noised.t, noised.text, noised.text_mask)
        loss = flow_matching_term(prediction, noised, weights)
        if self.teacher is not None:
            loss = loss + self.config.distill_lambda * distillation_term(prediction, self.teacher, noised, weights)
        return loss


@dataclass
class Optimisation:
    """What a step updates: the weights, the network that runs them (DDP-wrapped, compiled), AdamW, its schedule,
    the EMA."""

    model: nn.Module
    network: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    ema: EMA
    grad_clip: float | None


def train_step(optimisation: Optimisation, objective: Objective, batch: dict[str, Any], *,
               generator: torch.Generator, precision: Precision, device: torch.device) -> tuple[float, float]:
    """Forward, backward, clip, AdamW and EMA on one batch -> (loss, grad norm before clipping)."""
    tensors = {name: batch[name].to(device, non_blocking=True) for name in ("latent", "text", "text_mask", "weights")}
    optimisation.model.train()
    with autocast(precision, device):
        loss = objective.loss(optimisation.network, tensors, generator)
    optimisation.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip = optimisation.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(optimisation.model.parameters(), clip if clip else float("inf"))
    optimisation.optimizer.step()
    optimisation.schedule.step()
    optimisation.ema.update(optimisation.model)
    return float(loss.detach()), float(grad_norm)
