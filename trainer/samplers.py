"""ODE samplers for the flow `dx/dt = v(x, t)` from t=1 (noise) to t=0 (data), the flow's reverse SDE (Hi-DiT's
sampler), and CFG (optionally only inside a guidance interval of t) as a velocity wrapper."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

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


def sde(velocity: Velocity, x: torch.Tensor, schedule: torch.Tensor, *, diffusion: float = 1.0,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Euler-Maruyama on the flow's reverse SDE `dx = [v - g²/2·score] dt + g dW̄`, with g(t)² = 2·diffusion·t.

    For `x_t = (1-t)·x0 + t·ε` the score is `-E[ε | x_t] / t` and `E[ε | x_t] = x + (1-t)·v`, so the drift is
    `v + diffusion·(x + (1-t)·v)`: bounded at t -> 0. Every such SDE has the ODE's marginals; the last step is
    a plain Euler step (no noise is added on the way into the data), as SiT's sampler does.
    """
    last = len(schedule) - 2
    for index, (t, t_next) in enumerate(zip(schedule[:-1], schedule[1:], strict=True)):
        x = _sde_step(x, velocity(x, _at(t, x)), t, t_next, diffusion if index != last else 0.0, generator)
    return x


def _sde_step(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, diffusion: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """One Euler-Maruyama step of the reverse SDE from t to t_next < t; diffusion=0 is an Euler step of the ODE."""
    dt = (t_next - t).to(x.dtype)  # < 0
    if diffusion == 0:
        return x + dt * v
    eps = x + (1 - t).to(x.dtype) * v  # E[ε | x_t]
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + dt * (v + diffusion * eps) + torch.sqrt(2 * diffusion * t.to(x.dtype) * -dt) * noise


SAMPLERS: dict[str, Callable[[Velocity, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "euler": euler,
    "heun": heun,
    "rk4": rk4,
}
SAMPLER_NAMES = (*SAMPLERS, "sde")  # the ODE solvers and the SDE sampler (which also takes a generator)


class SamplerSettings(StrictModel):
    """How images are sampled: the solver, its steps and time shift, the CFG scale and interval, the seed, the
    batch."""

    steps: int = Field(20, ge=1)
    cfg: float = Field(3.5, ge=0, description="classifier-free guidance scale (1 = off)")
    guidance_low: float = Field(0.0, ge=0, le=1, description="CFG only for t in [guidance_low, guidance_high]")
    guidance_high: float = Field(1.0, ge=0, le=1, description="(t=1 is noise; the default interval is every t)")
    sampler: Literal["euler", "heun", "rk4", "sde"] = "heun"
    sde_diffusion: float = Field(1.0, gt=0, description="sde sampler: g(t)² = 2·sde_diffusion·t")
    pixel_stream: bool = Field(False, description="Hi-DiT models: below the model's pixel_gate_t also integrate "
                               "the pixel stream and return its pixels (else the codec decodes the latents)")
    shift: float = Field(1.0, gt=0, description="timestep shift of the sampling schedule")
    shift_base_tokens: int | None = Field(
        None, ge=1, description="resolution-aware shift: `shift` holds at this many image tokens and follows "
        "shift·sqrt(tokens / shift_base_tokens) at other sizes (SD3); None = `shift` at every size")
    seed: int = 0
    batch_size: int = Field(4, ge=1, description="prompts generated together")

    @model_validator(mode="after")
    def _check_interval(self) -> SamplerSettings:
        if self.guidance_low > self.guidance_high:
            raise ValueError(f"guidance_low={self.guidance_low} is above guidance_high={self.guidance_high}")
        return self


def classifier_free_guidance(velocity_cond: Velocity, velocity_uncond: Velocity, scale: float,
                             interval: tuple[float, float] = (0.0, 1.0)) -> Velocity:
    """`v_u + s·(v_c - v_u)` for t inside `interval` (Hi-DiT's guidance interval), `v_c` outside it: s=1 is the
    conditional model, s>1 pushes towards the caption. Outside the interval the unconditional model is not run."""
    if scale == 1.0:
        return velocity_cond
    low, high = interval

    def guided(x, t: torch.Tensor):
        cond = velocity_cond(x, t)
        inside = (t >= low) & (t <= high)  # (B,)
        if not bool(inside.any()):
            return cond
        return _guide(inside, velocity_uncond(x, t), cond, scale)

    return guided


def _guide(inside: torch.Tensor, uncond, cond, scale: float):
    """CFG where `inside`, the conditional velocity elsewhere; a tuple (Hi-DiT's latent and pixel velocities)
    is guided element by element."""
    if isinstance(cond, tuple):
        return tuple(_guide(inside, u, c, scale) for u, c in zip(uncond, cond, strict=True))
    guided = uncond + scale * (cond - uncond)
    return torch.where(inside.view(-1, *([1] * (cond.ndim - 1))), guided, cond)


def text_velocity(model, text: torch.Tensor, text_mask: torch.Tensor | None) -> Velocity:
    """Bind a DiT to one batch of captions: `velocity(x, t) = model(x, t, text, mask)`."""
    return lambda x, t: model(x, t, text, text_mask)


StreamsVelocity = Callable[[tuple[torch.Tensor, torch.Tensor], torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sample_with_pixel_stream(velocity: Velocity, streams_velocity: StreamsVelocity,
                             decode: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], *, gate_t: float,
                             sampler: str = "heun", steps: int = 20, shift: float = 1.0, seed: int = 0, device=None,
                             dtype=torch.float32, sde_diffusion: float = 1.0) -> torch.Tensor:
    """Hi-DiT sampling -> pixels (B, 3, H, W) in [-1, 1].

    Above `gate_t` the latent stream alone is integrated with `sampler`. At the first time t_g below it, the pixel
    stream starts from the codec's decoding of the latent's x0 estimate `x - t_g·v`, noised to t_g; from there
    both streams take Euler steps together (Euler-Maruyama for `sde`) with `streams_velocity((x, pixels), t)`.
    """
    schedule = timestep_schedule(steps, shift, device)
    split = next((i for i, t in enumerate(schedule.tolist()) if t < gate_t), len(schedule) - 1)
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if split > 0:
        if sampler == "sde":
            x = sde(velocity, x, schedule[:split + 1], diffusion=sde_diffusion, generator=generator)
        else:
            x = SAMPLERS[sampler](velocity, x, schedule[:split + 1])
    t_g = schedule[split].to(dtype)
    x0 = x - t_g * velocity(x, _at(schedule[split], x))
    pixels0 = decode(x0).to(dtype) * 2 - 1
    noise = torch.randn(pixels0.shape, generator=generator, device=pixels0.device, dtype=dtype)
    state = (x, (1 - t_g) * pixels0 + t_g * noise)
    last = len(schedule) - 2
    for index in range(split, len(schedule) - 1):
        t, t_next = schedule[index], schedule[index + 1]
        diffusion = sde_diffusion if sampler == "sde" and index != last else 0.0
        v = streams_velocity(state, _at(t, x))
        state = tuple(_sde_step(s, vs, t, t_next, diffusion, generator) for s, vs in zip(state, v, strict=True))
    return state[1]


def sample(velocity: Velocity, shape: tuple[int, ...], *, sampler: str = "heun", steps: int = 20,
           shift: float = 1.0, seed: int = 0, device=None, dtype=torch.float32,
           sde_diffusion: float = 1.0) -> torch.Tensor:
    """Integrate seeded Gaussian noise of `shape` from t=1 to t=0; the same seed gives the same latents (the
    sde sampler draws its step noise from the same seeded generator)."""
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    generator = torch.Generator(device=device or "cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    schedule = timestep_schedule(steps, shift, device)
    if sampler == "sde":
        return sde(velocity, noise, schedule, diffusion=sde_diffusion, generator=generator)
    return SAMPLERS[sampler](velocity, noise, schedule)
