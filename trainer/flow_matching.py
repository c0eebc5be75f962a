"""Rectified-flow training objective: sample t, mix `x_t=(1-t)·x0+t·ε`, regress the velocity `ε-x0`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from services.config import StrictModel


class TimestepSampling(StrictModel):
    """How training draws t in (0, 1); t=1 is pure noise."""

    distribution: Literal["logit_normal", "uniform"] = "logit_normal"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0, description="SD3 shift: >1 spends more steps near noise")
    shift_base_tokens: int | None = Field(
        None, ge=1, description="resolution-aware shift: `shift` holds at this many image tokens and follows "
        "shift·sqrt(tokens / shift_base_tokens) at others (SD3); None = the same shift at every resolution")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift `s·t / (1 + (s-1)·t)`: identity at s=1, maps 0->0 and 1->1."""
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(shift: float, base_tokens: int | None, tokens: int) -> float:
    """The shift at `tokens` image tokens: `shift·sqrt(tokens / base_tokens)` (SD3), `shift` when base_tokens is None.

    n times the tokens carry n times the signal of one noised image at the same t (a patch average keeps
    its signal and loses noise), so t must move towards noise to look as noisy. SD3 derives the factor
    sqrt(n) on the odds t/(1-t), which is `shift_timesteps`; shifts compose by multiplying, so a base shift s
    becomes s·sqrt(n).
    """
    if base_tokens is None:
        return shift
    return shift * math.sqrt(tokens / base_tokens)


def sample_timesteps(batch: int, sampling: TimestepSampling, device=None,
                     generator: torch.Generator | None = None, tokens: int | None = None) -> torch.Tensor:
    """(B,) training timesteps from the logit-normal or uniform distribution, then shifted (for `tokens` image
    tokens when the shift follows the resolution)."""
    if sampling.distribution == "logit_normal":
        normal = torch.randn(batch, device=device, generator=generator)
        t = torch.sigmoid(sampling.mean + sampling.std * normal)
    else:
        t = torch.rand(batch, device=device, generator=generator)
    if sampling.shift_base_tokens is not None and tokens is None:
        raise ValueError("a resolution-aware shift (shift_base_tokens) needs the batch's image token count")
    return shift_timesteps(t, resolution_shift(sampling.shift, sampling.shift_base_tokens, tokens or 0))


def apply_cfg_dropout(text: torch.Tensor, mask: torch.Tensor, null_text: torch.Tensor,
                      null_mask: torch.Tensor | None, p: float,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each caption by the null text with probability p (so the model also learns v(x, t, ∅) for CFG).

    text (B, L, D) and mask (B, L); null_text (L0, D) with null_mask (L0,) or None (all real).
    """
    if p <= 0:
        return text, mask
    null_len = null_text.shape[0]
    if null_len > text.shape[1]:  # pad the batch so the null text fits
        text = torch.nn.functional.pad(text, (0, 0, 0, null_len - text.shape[1]))
        mask = torch.nn.functional.pad(mask, (0, null_len - mask.shape[1]))
    null_row = text.new_zeros(text.shape[1:])
    null_row[:null_len] = null_text.to(text.dtype)
    null_row_mask = mask.new_zeros(mask.shape[1:])
    null_row_mask[:null_len] = True if null_mask is None else null_mask
    drop = torch.rand(text.shape[0], device=text.device, generator=generator) < p
    text = torch.where(drop[:, None, None], null_row, text)
    mask = torch.where(drop[:, None], null_row_mask, mask)
    return text, mask


@dataclass
class NoisedBatch:
    """One batch on the path: `x_t` at times `t`, the velocity `ε - x0` to regress, and the captions (after CFG dropout)."""

    x_t: torch.Tensor
    t: torch.Tensor
    target: torch.Tensor
    text: torch.Tensor
    text_mask: torch.Tensor


def noise_at(x0: torch.Tensor, t: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ε -> (`x_t = (1-t)·x0 + t·ε`, the velocity target `ε - x0`) for per-sample t (B,)."""
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    t_ = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t_) * x0 + t_ * noise, noise - x0


def noise_batch(x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                sampling: TimestepSampling | None = None, null_text: torch.Tensor | None = None,
                null_mask: torch.Tensor | None = None, cfg_dropout: float = 0.0,
                generator: torch.Generator | None = None, patch_size: int = 1) -> NoisedBatch:
    """Drop captions for CFG, sample t (shifted for the latents' token count at `patch_size`), mix
    `x_t = (1-t)·x0 + t·ε`."""
    sampling = sampling or TimestepSampling()
    if cfg_dropout > 0:
        if null_text is None:
            raise ValueError(f"cfg_dropout={cfg_dropout} needs null_text (the encoder's output for '')")
        text, text_mask = apply_cfg_dropout(text, text_mask, null_text, null_mask, cfg_dropout, generator)
    tokens = (x0.shape[-2] // patch_size) * (x0.shape[-1] // patch_size)
    t = sample_timesteps(x0.shape[0], sampling, x0.device, generator, tokens)
    x_t, target = noise_at(x0, t, generator)
    return NoisedBatch(x_t, t, target, text, text_mask)


def velocity_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error (B,), in fp32."""
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


# JiT's floor on t in an x-prediction's implied velocity `(x_t - x̂0) / t`: without it the loss weight 1/t² is unbounded
# near the data end, where the estimate is easiest.
CLEAN_PREDICTION_MIN_T = 0.05


def velocity_of_clean_estimate(x_t: torch.Tensor, clean: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The velocity a clean-data estimate x̂0 implies on the straight path through x_t: `(x_t - x̂0) / t`, t > 0."""
    return (x_t - clean) / t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)


@torch.no_grad()  # the codec is frozen, and the latent stream learns from its own loss
def decoded_latent_estimate(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor,
                            decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The codec's decoding (`decode`: latents -> [0, 1]) of the latent stream's clean estimate `x_t - t·v`, in
    [-1, 1]. Hi-DiT's clean image is this plus the pixel stream's residual."""
    latent_clean = x_t - t.view(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype) * velocity
    return decode(latent_clean.float()) * 2 - 1


def clean_prediction_mse(clean: torch.Tensor, x0: torch.Tensor, t: torch.Tensor,
                         min_t: float = CLEAN_PREDICTION_MIN_T) -> torch.Tensor:
    """Per-sample velocity MSE (B,) of an x-prediction: `|x̂0 - x0|² / max(t, min_t)²`, since the implied
    velocity misses `ε - x0` by exactly `(x0 - x̂0) / t`."""
    return velocity_mse(clean, x0) / t.float().clamp(min=min_t).pow(2)


def weighted_mean(per_sample: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """`Σ w·l / Σ w` (e.g. by aesthetic score, or 0 for a placeholder); the plain mean without weights."""
    if weights is None:
        return per_sample.mean()
    weights = weights.to(per_sample)
    return (weights * per_sample).sum() / weights.sum().clamp(min=1e-12)


def flow_matching_loss(model, x0: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, *,
                       sampling: TimestepSampling | None = None, null_text: torch.Tensor | None = None,
                       null_mask: torch.Tensor | None = None, cfg_dropout: float = 0.0,
                       weights: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       patch_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MSE between `model(x_t, t, text, mask)` and `ε - x0` -> (loss, per-sample loss (B,), t (B,)).

    With `weights` (B,) the loss is the weighted mean `Σ w·l / Σ w` (e.g. by aesthetic score).
    """
    noised = noise_batch(x0, text, text_mask, sampling=sampling, null_text=null_text, null_mask=null_mask,
                         cfg_dropout=cfg_dropout, generator=generator, patch_size=patch_size)
    prediction = model(noised.x_t, noised.t, noised.text, noised.text_mask)
    per_sample = velocity_mse(prediction, noised.target)
    return weighted_mean(per_sample, weights), per_sample, noised.t
