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
