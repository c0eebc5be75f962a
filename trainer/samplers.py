"""ODE samplers for the flow `dx/dt = v(x, t)` from t=1 (noise) to t=0 (data), and CFG as a velocity wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field

from services.config import StrictModel
from trainer.flow_matching import shift_timesteps

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # velocity(x (B, ...), t (B,)) -> like x


def timestep_schedule(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """`steps + 1` times from 1 down to 0, uniform before the resolution shift."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64), shift)


def _at(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Scalar time -> (B,) in x's dtype, as the velocity callable expects."""
    return t.to(x.dtype).expand(x.shape[0])


def euler(velocity: Velocity, x: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """First-order: one velocity per step."""
    for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        x = x + (t_next - t).to(x.dtype) * velocity(x, _at(t, x))
    return x


def heun(velocity: Velocity, x: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """Second-order: Euler predictor, trapezoidal corrector (two velocities per step)."""
    for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        dt = (t_next - t).to(x.dtype)
        v = velocity(x, _at(t, x))
        v_next = velocity(x + dt * v, _at(t_next, x))
        x = x + dt * (v + v_next) / 2
    return x


def rk4(velocity: Velocity, x: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
    """Classical fourth-order Runge-Kutta (four velocities per step)."""
    for t, t_next in zip(schedule[:-1], schedule[1:], strict=True):
        dt = (t_next - t).to(x.dtype)
        t_mid = (t + t_next) / 2
        k1 = velocity(x, _at(t, x))
        k2 = velocity(x + dt / 2 * k1, _at(t_mid, x))
        k3 = velocity(x + dt / 2 * k2, _at(t_mid, x))
        k4 = velocity(x + dt * k3, _at(t_next, x))
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


SAMPLERS: dict[str, Callable[[Velocity, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "euler": euler,
    "heun": heun,
    "rk4": rk4,
}


class SamplerSettings(StrictModel):
    """How images are sampled: the ODE solver, its steps and time shift, the CFG scale, the seed, the batch."""

    steps: int = Field(20, ge=1)
    cfg: float = Field(3.5, ge=0, description="classifier-free guidance scale (1 = off)")
    sampler: Literal["euler", "heun", "rk4"] = "heun"
    shift: float = Field(1.0, gt=0, description="timestep shift of the sampling schedule")
    shift_base_tokens: int | None = Field(
        None, ge=1, description="resolution-aware shift: `shift` holds at this many image tokens and follows "
        "shift·sqrt(tokens / shift_base_tokens) at other sizes (SD3); None = `shift` at every size")
    seed: int = 0
    batch_size: int = Field(4, ge=1, description="prompts generated together")


def classifier_free_guidance(velocity_cond: Velocity, velocity_uncond: Velocity, scale: float) -> Velocity:
    """`v_u + s·(v_c - v_u)`: s=1 is the conditional model, s>1 pushes towards the caption."""
    if scale == 1.0:
        return velocity_cond

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        uncond = velocity_uncond(x, t)
        return uncond + scale * (velocity_cond(x, t) - uncond)

    return guided


def text_velocity(model, text: torch.Tensor, text_mask: torch.Tensor | None) -> Velocity:
    """Bind a DiT to one batch of captions: `velocity(x, t) = model(x, t, text, mask)`."""
    return lambda x, t: model(x, t, text, text_mask)


def sample(velocity: Velocity, shape: tuple[int, ...], *, sampler: str = "heun", steps: int = 20,
           shift: float = 1.0, seed: int = 0, device=None, dtype=torch.float32) -> torch.Tensor:
    """Integrate seeded Gaussian noise of `shape` from t=1 to t=0; the same seed gives the same latents."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    return SAMPLERS[sampler](velocity, noise, timestep_schedule(steps, shift, device))
