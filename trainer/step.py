"""One optimisation step: the loss terms as functions (flow matching, LiT distillation), then backward, clip, AdamW,
EMA."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import Precision, TrainJobConfig
from trainer.ema import EMA
from trainer.flow_matching import (
    NoisedBatch,
    clean_prediction_mse,
    decoded_latent_estimate,
    noise_at,
    noise_batch,
    velocity_mse,
    weighted_mean,
)
from trainer.models import DiTConfig
from trainer.models.hybrid_dit import DiTOutputs
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


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Cached pixels (B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the pixel stream's data space."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def pixel_flow_matching_term(pixel_clean: torch.Tensor, pixels: torch.Tensor, t: torch.Tensor, gated: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """Hi-DiT's pixel loss: the weighted MSE of the pixel velocity that the clean-image estimate implies, on the
    samples whose pixel tokens were injected (`gated`, t below the threshold) only."""
    return weighted_mean(clean_prediction_mse(pixel_clean, pixels, t), weights * gated.to(weights.dtype))


def pixel_clean_estimate(out: DiTOutputs, x_t: torch.Tensor, t: torch.Tensor, gated: torch.Tensor,
                         decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Hi-DiT's clean image (B, 3, H, W): the decoded latent estimate plus the residual, decoding only the `gated`
    rows (the others carry no pixel loss: their residual alone keeps every rank's graph the same)."""
    decoded = torch.zeros_like(out.pixel_residual)
    if gated.any():
        decoded[gated] = decoded_latent_estimate(x_t[gated], t[gated], out.velocity[gated], decode).to(decoded.dtype)
    return decoded + out.pixel_residual


def repa_term(projected: torch.Tensor, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """REPA: the weighted mean over samples of the negative cosine similarity, averaged over tokens, between the
    projected image tokens and the frozen encoder's features (B, N, D) of the clean image."""
    cosine = F.cosine_similarity(projected.float(), features.float(), dim=-1)  # (B, N)
    return weighted_mean(-cosine.mean(dim=1), weights)


@dataclass
class Objective:
    """The loss of a run: flow matching with CFG dropout, plus LiT's hybrid distillation when a teacher is set,
    `L = L_simple + λ1·L_noise + λ2·L_var` (λ1, λ2 = `distill_noise_lambda`, `distill_var_lambda`), plus in
    Hi-DiT's recipe the weighted pixel loss (stage 2, `pixel_branch`) and REPA (`repa`)."""

    config: TrainJobConfig
    null_text: torch.Tensor | None
    teacher: nn.Module | None = None
    model_config: DiTConfig | None = None  # the patch size (resolution-aware shift), the pixel stream's factor and gate
    feature_encoder: nn.Module | None = None  # REPA's frozen image encoder
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # Hi-DiT's stage 2: the cache's codec, latents -> [0, 1]

    def loss(self, network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        weights = batch["weights"]
        noised = noise_batch(batch["latent"], batch["text"], batch["text_mask"], sampling=self.config.timesteps,
                             null_text=self.null_text, cfg_dropout=self.config.cfg_dropout, generator=generator,
                             patch_size=self.model_config.patch_size if self.model_config else 1)
        pixel_branch, repa = self.config.pixel_branch, self.config.repa
        if pixel_branch is None and repa is None:
            prediction = network(noised.x_t, noised.t, noised.text, noised.text_mask)
            return self._latent_loss(prediction, noised, weights)
        # Hi-DiT: both streams at the same t, the pixels noised with their own ε; REPA reads the clean pixels
        pixels = self._pixels(batch)
        pixel_t = None
        if pixel_branch is not None:
            pixel_t, _ = noise_at(pixels, noised.t, generator)
        out = network(noised.x_t, noised.t, noised.text, noised.text_mask, pixels=pixel_t, repa=repa is not None)
        loss = self._latent_loss(out.velocity, noised, weights)
        if pixel_branch is not None:
            gated = noised.t < self.model_config.pixel_gate_t
            clean = pixel_clean_estimate(out, noised.x_t, noised.t, gated, self.decode)
            loss = loss + pixel_branch.weight * pixel_flow_matching_term(clean, pixels, noised.t, gated, weights)
        if repa is not None:
            features = self.feature_encoder((pixels + 1) / 2, out.grid)
            loss = loss + repa.weight * repa_term(out.repa_tokens, features, weights)
        return loss

    def _latent_loss(self, prediction: torch.Tensor, noised: NoisedBatch, weights: torch.Tensor) -> torch.Tensor:
        loss = flow_matching_term(prediction, noised, weights)
        if self.teacher is not None:
            terms = distillation_terms(prediction, self.teacher, noised, weights)
            loss = (loss + self.config.distill_noise_lambda * terms.noise
                    + self.config.distill_var_lambda * terms.variance)
        return loss

    def _pixels(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's clean pixels in [-1, 1] (B, 3, H, W)."""
        weights, latent = batch["weights"], batch["latent"]
        pixels = batch.get("pixels")
        if pixels is None:
            if bool(weights.any()):
                raise ValueError("pixel_branch and repa need the cache's pixels, and this batch has none: encode the "
                                 "cache with output.store_pixels=true")
            # every sample is a zero-weight placeholder: black pixels keep every rank's graph the same
            factor = self.model_config.pixel_factor
            pixels = latent.new_zeros(latent.shape[0], latent.shape[2] * factor, latent.shape[3] * factor, 3,
                                      dtype=torch.uint8)
        return pixels_to_unit_range(pixels)


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
    names = ("latent", "text", "text_mask", "weights", "pixels")
    tensors = {name: batch[name].to(device, non_blocking=True) for name in names if name in batch}
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
