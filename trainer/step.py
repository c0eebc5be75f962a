"""One optimisation step: the loss terms as functions (flow matching, distillation), then backward, clip, AdamW, EMA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import Precision, TrainJobConfig
from trainer.ema import EMA
from trainer.flow_matching import NoisedBatch, noise_at, noise_batch, velocity_mse, weighted_mean
from trainer.models import DiTConfig
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


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """Cached pixels (B, H, W, 3) uint8 -> (B, 3, H, W) float in [-1, 1], the pixel stream's data space."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def pixel_flow_matching_term(pixel_prediction: torch.Tensor, pixel_target: torch.Tensor, gated: torch.Tensor,
                             weights: torch.Tensor) -> torch.Tensor:
    """Hi-DiT's pixel loss: the weighted MSE of the sub-pixel head's pixel velocity, on the samples whose pixel
    tokens were injected (`gated`, t below the threshold) only."""
    return weighted_mean(velocity_mse(pixel_prediction, pixel_target), weights * gated.to(weights.dtype))


def repa_term(projected: torch.Tensor, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """REPA: the weighted mean over samples of the negative cosine similarity, averaged over tokens, between the
    projected image tokens and the frozen encoder's features (B, N, D) of the clean image."""
    cosine = F.cosine_similarity(projected.float(), features.float(), dim=-1)  # (B, N)
    return weighted_mean(-cosine.mean(dim=1), weights)


@dataclass
class Objective:
    """The loss of a run: flow matching with CFG dropout, plus `distill_lambda` x distillation when a teacher is set,
    plus in Hi-DiT's recipe the weighted pixel loss (stage 2, `pixel_branch`) and REPA (`repa`)."""

    config: TrainJobConfig
    null_text: torch.Tensor | None
    teacher: nn.Module | None = None
    model_config: DiTConfig | None = None  # the pixel stream's factor and gate threshold
    feature_encoder: nn.Module | None = None  # REPA's frozen image encoder

    def loss(self, network: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        weights = batch["weights"]
        noised = noise_batch(batch["latent"], batch["text"], batch["text_mask"], sampling=self.config.timesteps,
                             null_text=self.null_text, cfg_dropout=self.config.cfg_dropout, generator=generator)
        pixel_branch, repa = self.config.pixel_branch, self.config.repa
        if pixel_branch is None and repa is None:
            prediction = network(noised.x_t, noised.t, noised.text, noised.text_mask)
            return self._latent_loss(prediction, noised, weights)
        # Hi-DiT: both streams at the same t, the pixels noised with their own ε; REPA reads the clean pixels
        pixels = self._pixels(batch)
        pixel_t = pixel_target = None
        if pixel_branch is not None:
            pixel_t, pixel_target = noise_at(pixels, noised.t, generator)
        out = network(noised.x_t, noised.t, noised.text, noised.text_mask, pixels=pixel_t, repa=repa is not None)
        loss = self._latent_loss(out.velocity, noised, weights)
        if pixel_branch is not None:
            gated = noised.t < self.model_config.pixel_gate_t
            loss = loss + pixel_branch.weight * pixel_flow_matching_term(out.pixel_velocity, pixel_target, gated,
                                                                        weights)
        if repa is not None:
            features = self.feature_encoder((pixels + 1) / 2, out.grid)
            loss = loss + repa.weight * repa_term(out.repa_tokens, features, weights)
        return loss

    def _latent_loss(self, prediction: torch.Tensor, noised: NoisedBatch, weights: torch.Tensor) -> torch.Tensor:
        loss = flow_matching_term(prediction, noised, weights)
        if self.teacher is not None:
            loss = loss + self.config.distill_lambda * distillation_term(prediction, self.teacher, noised, weights)
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
