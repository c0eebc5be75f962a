"""One optimisation step: the loss terms as functions (flow matching, LiT distillation), then backward, clip, AdamW,
EMA."""

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


def prediction_error_variance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C): each sample's and channel's mean squared error over positions, the variance of the reverse step
    a velocity model implies.

    A model trained with MSE predicts the mean E[v | x_t]; the reverse process's variance that a learned-variance
    DiT outputs is then E[(v - v̂)² | x_t] (Bao et al. 2022 estimate the optimal diagonal covariance of a
    mean-only model this way). One draw of v per sample gives a noisy per-element estimate; averaging over the
    positions of a channel makes it a usable one.
    """
    return (prediction.float() - target.float()).pow(2).flatten(2).mean(dim=2)


@dataclass
class DistillationTerms:
    """LiT's hybrid distillation terms, each a weighted mean over the batch and zero when student == teacher."""

    noise: torch.Tensor  # L_noise: MSE between the student's and the teacher's velocity
    variance: torch.Tensor  # L_var: MSE between their implied reverse-step variances (B, C)


def distillation_terms(prediction: torch.Tensor, teacher: nn.Module, noised: NoisedBatch,
                       weights: torch.Tensor) -> DistillationTerms:
    """LiT distillation at the student's x_t and t: the frozen teacher runs without gradients, so both terms
    train only the student.

    L_noise compares the velocities, the space L_simple regresses in (so λ1 weighs the two as the paper's
    ε-space terms are weighed); the implied noise ε = x_t + (1-t)·v would scale it by (1-t)² and drop the
    teacher's signal near t=1, where the first sampling steps settle the layout. L_var compares
    `prediction_error_variance` against the same sampled target.
    """
    with torch.no_grad():
        taught = teacher(noised.x_t, noised.t, noised.text, noised.text_mask)
    variance = velocity_mse(prediction_error_variance(prediction, noised.target),
                            prediction_error_variance(taught, noised.target))
    return DistillationTerms(noise=weighted_mean(velocity_mse(prediction, taught), weights),
                             variance=weighted_mean(variance, weights))


@dataclass
class Objective:
    """The loss of a run: flow matching with CFG dropout, plus LiT's hybrid distillation when a teacher is set,
    `L = L_simple + λ1·L_noise + λ2·L_var` (λ1, λ2 = `distill_noise_lambda`, `distill_var_lambda`)."""

    config: TrainJobConfig
    null_text: torch.Tensor | None
    teacher: nn.Module | None = None
    patch_size: int = 1  # the model's, so that a resolution-aware shift counts image tokens

    def loss(self, network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        weights = batch["weights"]
        noised = noise_batch(batch["latent"], batch["text"], batch["text_mask"], sampling=self.config.timesteps,
                             null_text=self.null_text, cfg_dropout=self.config.cfg_dropout, generator=generator,
                             patch_size=self.patch_size)
        prediction = network(noised.x_t, noised.t, noised.text, noised.text_mask)
        loss = flow_matching_term(prediction, noised, weights)
        if self.teacher is not None:
            terms = distillation_terms(prediction, self.teacher, noised, weights)
            loss = (loss + self.config.distill_noise_lambda * terms.noise
                    + self.config.distill_var_lambda * terms.variance)
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
