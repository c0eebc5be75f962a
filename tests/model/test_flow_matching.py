import pytest
import torch

from trainer.flow_matching import (
    CLEAN_PREDICTION_MIN_T,
    TimestepSampling,
    apply_cfg_dropout,
    clean_prediction_mse,
    flow_matching_loss,
    noise_at,
    sample_timesteps,
    shift_timesteps,
    velocity_mse,
    velocity_of_clean_estimate,
)


def exact_velocity_for_zero_data(x_t, t, text, mask):
    """With x0 = 0, x_t = t·ε, so the true velocity ε - x0 is x_t / t."""
    return x_t / t.view(-1, 1, 1, 1)


def test_loss_is_zero_for_the_exact_velocity_eps_minus_x0():
    x0 = torch.zeros(4, 2, 3, 3)
    loss, per_sample, t = flow_matching_loss(exact_velocity_for_zero_data, x0, torch.zeros(4, 1, 5),
                                             torch.ones(4, 1, dtype=torch.bool),
                                             generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10 and per_sample.shape == (4,) and t.shape == (4,)


def test_predicting_zero_costs_the_mean_squared_velocity():
    x0 = torch.ones(3, 1, 2, 2)
    generator = torch.Generator().manual_seed(1)
    _, per_sample, t = flow_matching_loss(lambda x, t, *_: torch.zeros_like(x), x0, torch.zeros(3, 1, 4),
                                          torch.ones(3, 1, dtype=torch.bool), generator=generator)
    replay = torch.Generator().manual_seed(1)
    sample_timesteps(3, TimestepSampling(), generator=replay)
    noise = torch.randn(x0.shape, generator=replay)
    torch.testing.assert_close(per_sample, (noise - x0).pow(2).flatten(1).mean(1))


def test_the_exact_clean_estimate_implies_the_exact_velocity():
    x0 = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0.01, 0.2, 0.9])
    x_t, target = noise_at(x0, t, torch.Generator().manual_seed(3))
    torch.testing.assert_close(velocity_of_clean_estimate(x_t, x0, t), target)


def test_an_x_predictions_loss_is_the_mse_of_its_implied_velocity_with_t_floored():
    generator = torch.Generator().manual_seed(4)
    x0, estimate = torch.randn(4, 3, 4, 4, generator=generator), torch.randn(4, 3, 4, 4, generator=generator)
    t = torch.tensor([CLEAN_PREDICTION_MIN_T, 0.1, 0.3, 0.8])
    x_t, target = noise_at(x0, t, generator)
    torch.testing.assert_close(clean_prediction_mse(estimate, x0, t),
                               velocity_mse(velocity_of_clean_estimate(x_t, estimate, t), target))
    # below the floor the weight stays at 1 / min_t²: the error near the data end cannot dominate the loss
    near_data = torch.full((4,), CLEAN_PREDICTION_MIN_T / 10)
    torch.testing.assert_close(clean_prediction_mse(estimate, x0, near_data),
                               velocity_mse(estimate, x0) / CLEAN_PREDICTION_MIN_T**2)
    assert torch.count_nonzero(clean_prediction_mse(x0, x0, t)) == 0


def test_per_sample_weights_give_the_weighted_mean():
    x0 = torch.randn(3, 1, 2, 2)
    text, mask = torch.zeros(3, 1, 4), torch.ones(3, 1, dtype=torch.bool)
    weights = torch.tensor([1.0, 0.0, 3.0])
    loss, per_sample, _ = flow_matching_loss(lambda x, *_: torch.zeros_like(x), x0, text, mask, weights=weights,
                                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, (per_sample[0] + 3 * per_sample[2]) / 4)


def test_logit_normal_timesteps_lie_in_open_unit_interval_centred_at_half():
    t = sample_timesteps(20000, TimestepSampling(), generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.median().item() - 0.5) < 0.02


def test_shift_above_one_moves_timesteps_towards_noise():
    t = sample_timesteps(4096, TimestepSampling(distribution="uniform", shift=3.0),
                         generator=torch.Generator().manual_seed(0))
    assert t.mean() > 0.6
    assert shift_timesteps(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_cfg_dropout_with_p_one_replaces_every_caption_by_the_null_text():
    text, mask = torch.randn(3, 4, 2), torch.ones(3, 4, dtype=torch.bool)
    null_text = torch.full((2, 2), 7.0)
    dropped, dropped_mask = apply_cfg_dropout(text, mask, null_text, None, 1.0)
    assert torch.equal(dropped[:, :2], null_text.expand(3, 2, 2))
    assert dropped_mask.tolist() == [[True, True, False, False]] * 3


def test_cfg_dropout_drops_about_p_of_captions():
    text, mask = torch.ones(10000, 2, 1), torch.ones(10000, 2, dtype=torch.bool)
    dropped, _ = apply_cfg_dropout(text, mask, torch.zeros(1, 1), None, 0.1, torch.Generator().manual_seed(0))
    assert abs((dropped[:, 0, 0] == 0).float().mean().item() - 0.1) < 0.01


def test_cfg_dropout_without_null_text_is_an_error_naming_it():
    with pytest.raises(ValueError, match="null_text"):
        flow_matching_loss(lambda x, *_: x, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2),
                           torch.ones(1, 1, dtype=torch.bool), cfg_dropout=0.1)


def test_the_resolution_aware_shift_is_the_configured_shift_at_the_base_token_count_and_grows_with_tokens():
    from trainer.flow_matching import resolution_shift

    assert resolution_shift(3.0, 1024, 1024) == 3.0
    shifts = [resolution_shift(3.0, 1024, tokens) for tokens in (256, 1024, 4096, 16384)]
    assert shifts == sorted(shifts) and len(set(shifts)) == 4
    assert shifts[2] == pytest.approx(6.0)  # SD3: 4x the tokens, sqrt(4) times the shift
    assert resolution_shift(3.0, None, 16384) == 3.0  # off: the same shift at every resolution


def test_training_timesteps_take_the_shift_of_the_batchs_token_count():
    from trainer.flow_matching import noise_batch

    aware = TimestepSampling(distribution="uniform", shift=1.5, shift_base_tokens=16)
    x0, text, mask = torch.zeros(64, 1, 8, 8), torch.zeros(64, 1, 2), torch.ones(64, 1, dtype=torch.bool)
    # 8x8 latents at patch 2 are 16 tokens (the base), at patch 1 they are 64 (4x: the shift doubles)
    at_base = noise_batch(x0, text, mask, sampling=aware, generator=torch.Generator().manual_seed(0), patch_size=2)
    larger = noise_batch(x0, text, mask, sampling=aware, generator=torch.Generator().manual_seed(0), patch_size=1)
    fixed = [sample_timesteps(64, TimestepSampling(distribution="uniform", shift=shift),
                              generator=torch.Generator().manual_seed(0)) for shift in (1.5, 3.0)]
    torch.testing.assert_close(at_base.t, fixed[0])
    torch.testing.assert_close(larger.t, fixed[1])
    with pytest.raises(ValueError, match="token count"):
        sample_timesteps(4, aware)
