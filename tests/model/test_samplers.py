import math

import pytest
import torch

from trainer.samplers import SAMPLERS, classifier_free_guidance, sample, timestep_schedule


def analytic_velocity(x, t):
    """dx/dt = cos(t)·x, whose exact solution is x(t) = x(1)·exp(sin t - sin 1)."""
    return torch.cos(t).view(-1, 1) * x


def error_at_zero(sampler: str, steps: int) -> float:
    x1 = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)
    x0 = SAMPLERS[sampler](analytic_velocity, x1, timestep_schedule(steps))
    exact = x1 * math.exp(math.sin(0.0) - math.sin(1.0))
    return (x0 - exact).abs().max().item()


@pytest.mark.parametrize(("sampler", "order"), [("euler", 1), ("heun", 2), ("rk4", 4)])
def test_sampler_error_shrinks_with_its_order(sampler, order):
    # halving the step size divides the global error by about 2**order
    ratio = error_at_zero(sampler, 8) / error_at_zero(sampler, 16)
    assert 0.8 * 2**order < ratio < 1.25 * 2**order, ratio


def test_higher_order_samplers_are_more_accurate_at_equal_steps():
    errors = [error_at_zero(name, 10) for name in ("euler", "heun", "rk4")]
    assert errors[0] > errors[1] > errors[2]


def test_timestep_schedule_runs_from_noise_to_data_and_shift_keeps_endpoints():
    schedule = timestep_schedule(4, shift=3.0)
    assert schedule[0] == 1 and schedule[-1] == 0 and len(schedule) == 5
    assert (schedule[1:-1] > timestep_schedule(4)[1:-1]).all()


def test_cfg_wrapper_extrapolates_from_unconditional_towards_conditional():
    guided = classifier_free_guidance(lambda x, t: x + 1, lambda x, t: x, scale=3.5)
    assert torch.equal(guided(torch.zeros(2), torch.zeros(2)), torch.full((2,), 3.5))


def test_same_seed_gives_identical_samples_and_new_seed_differs():
    def velocity(x, t):
        return -x * t.view(-1, 1, 1, 1)

    first = sample(velocity, (2, 3, 4, 4), sampler="heun", steps=3, seed=7)
    again = sample(velocity, (2, 3, 4, 4), sampler="heun", steps=3, seed=7)
    other = sample(velocity, (2, 3, 4, 4), sampler="heun", steps=3, seed=8)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_unknown_sampler_is_an_error_listing_the_choices():
    with pytest.raises(ValueError, match="euler, heun, rk4"):
        sample(lambda x, t: x, (1, 1), sampler="ddim")


def test_cfg_is_applied_only_inside_the_guidance_interval():
    calls = []

    def unconditional(x, t):
        calls.append(t.clone())
        return x

    guided = classifier_free_guidance(lambda x, t: x + 1, unconditional, scale=3.0, interval=(0.2, 0.6))
    x = torch.zeros(3, 2)
    for value, expected in [(0.0, 1.0), (0.19, 1.0), (0.2, 3.0), (0.4, 3.0), (0.6, 3.0), (0.61, 1.0), (1.0, 1.0)]:
        assert torch.equal(guided(x, torch.full((3,), value)), torch.full((3, 2), expected)), value
    assert [round(t[0].item(), 2) for t in calls] == [0.2, 0.4, 0.6]  # the unconditional model ran only inside
    per_sample = guided(x, torch.tensor([0.1, 0.5, 0.9]))
    assert per_sample[:, 0].tolist() == [1.0, 3.0, 1.0]


def test_guidance_interval_must_be_ordered():
    from trainer.samplers import SamplerSettings

    with pytest.raises(ValueError, match="guidance_low"):
        SamplerSettings(guidance_low=0.8, guidance_high=0.2)


def gaussian_velocity(mean: float, std: float):
    """The exact flow velocity E[ε - x0 | x_t] for data x0 ~ N(mean, std²) and `x_t = (1-t)·x0 + t·ε`."""

    def velocity(x, t):
        t = t.view(-1, *([1] * (x.ndim - 1)))
        centred = x - (1 - t) * mean
        variance = (1 - t) ** 2 * std**2 + t**2
        expected_x0 = mean + (1 - t) * std**2 / variance * centred
        expected_eps = t / variance * centred
        return expected_eps - expected_x0

    return velocity


@pytest.mark.parametrize("diffusion", [0.5, 1.0, 2.0])
def test_sde_sampler_reaches_a_known_gaussian_target(diffusion):
    mean, std = 1.5, 0.4
    samples = sample(gaussian_velocity(mean, std), (20_000, 2), sampler="sde", steps=200, seed=3,
                     dtype=torch.float64, sde_diffusion=diffusion)
    assert samples.mean().item() == pytest.approx(mean, abs=0.02)
    assert samples.std().item() == pytest.approx(std, rel=0.03)


def test_sde_sampler_is_stochastic_beside_the_ode_and_seeded():
    velocity = gaussian_velocity(0.0, 0.5)
    ode = sample(velocity, (8, 2), sampler="euler", steps=20, seed=1, dtype=torch.float64)
    first = sample(velocity, (8, 2), sampler="sde", steps=20, seed=1, dtype=torch.float64)
    again = sample(velocity, (8, 2), sampler="sde", steps=20, seed=1, dtype=torch.float64)
    assert torch.equal(first, again)
    assert not torch.allclose(first, ode, atol=1e-3)


def constant_data_velocity(target: float):
    """The exact velocity `(x - c)/t` of the flow whose data is the constant c: Euler lands on c exactly."""
    return lambda x, t: (x - target) / t.view(-1, *([1] * (x.ndim - 1)))


@pytest.mark.parametrize("sampler", ["euler", "heun", "sde"])
def test_pixel_stream_sampling_integrates_both_streams_below_the_gate_only(sampler):
    from trainer.samplers import sample_with_pixel_stream

    gate, latent_times, stream_times = 0.45, [], []
    latent_velocity = constant_data_velocity(0.25)

    def velocity(x, t):
        latent_times.append(t[0].item())
        return latent_velocity(x, t)

    def streams(state, t):
        stream_times.append(t[0].item())
        return latent_velocity(state[0], t), constant_data_velocity(-0.5)(state[1], t)

    def decode(z):  # an f2 "codec": nearest upsampling of channel 0 to RGB, in [0, 1]
        return torch.nn.functional.interpolate(z[:, :1], scale_factor=2).expand(-1, 3, -1, -1)

    pixels = sample_with_pixel_stream(velocity, streams, decode, (3, 2, 4, 4), gate_t=gate, sampler=sampler,
                                      steps=10, seed=0, dtype=torch.float64)
    assert pixels.shape == (3, 3, 8, 8)
    torch.testing.assert_close(pixels, torch.full_like(pixels, -0.5))
    assert min(latent_times) >= 0.4 - 1e-9 and max(stream_times) < gate  # the x0 estimate is read at t=0.4
    assert sorted(set(round(t, 6) for t in stream_times)) == [0.1, 0.2, 0.3, 0.4]


def test_pixel_stream_sampling_with_no_gated_step_is_plain_sampling_then_decoding():
    from trainer.samplers import sample_with_pixel_stream

    def velocity(x, t):
        return torch.cos(t).view(-1, 1, 1, 1) * x

    def decode(z):
        return z[:, :3] * 0.5 + 0.5

    plain = sample(velocity, (2, 3, 4, 4), sampler="heun", steps=6, seed=4, dtype=torch.float64)
    pixels = sample_with_pixel_stream(velocity, None, decode, (2, 3, 4, 4), gate_t=0.0, sampler="heun", steps=6,
                                      seed=4, dtype=torch.float64)
    assert torch.equal(pixels, decode(plain) * 2 - 1)


def test_cfg_guides_the_latent_and_pixel_velocities_alike():
    guided = classifier_free_guidance(lambda x, t: (x[0] + 1, x[1] + 2), lambda x, t: x, scale=2.0,
                                      interval=(0.0, 0.5))
    state = (torch.zeros(2, 1), torch.zeros(2, 3))
    latent, pixels = guided(state, torch.tensor([0.2, 0.8]))
    assert latent[:, 0].tolist() == [2.0, 1.0] and pixels[:, 0].tolist() == [4.0, 2.0]
