"""Optimiser schedule, EMA, precision guard, activation checkpointing and the job config."""

from __future__ import annotations

import math

import pytest
import torch

from services.config import ConfigError, load_config
from trainer.config import OptimizerConfig, TrainJobConfig
from trainer.ema import EMA
from trainer.models import build_model
from trainer.models.hybrid_dit import DiTBlock
from trainer.optim import build_optimizer, warmup_cosine
from trainer.precision import PrecisionUnavailableError, apply_activation_checkpointing, precision_for_device

CPU = torch.device("cpu")


def test_lr_ramps_linearly_then_follows_a_cosine_to_the_floor():
    values = [warmup_cosine(step, 100, 10, 0.1) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_weight_decay_applies_to_matrices_only():
    optimizer, _ = build_optimizer(build_model("HybridDiT-tiny"), OptimizerConfig(weight_decay=0.05), 10)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.05 and all(p.ndim >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim < 2 for p in plain["params"])


def test_ema_moves_each_weight_by_one_minus_decay_towards_the_model():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.75)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(4.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, start + 1.0)


def test_fp8_on_a_cpu_is_a_clear_error_unless_fallback_is_allowed():
    with pytest.raises(PrecisionUnavailableError, match="allow_fp8_fallback"):
        precision_for_device("fp8", CPU, allow_fp8_fallback=False)
    assert precision_for_device("fp8", CPU, allow_fp8_fallback=True) == "fp32"


def test_bf16_autocast_is_refused_on_a_cpu():
    with pytest.raises(PrecisionUnavailableError, match="precision=fp32"):
        precision_for_device("bf16", CPU, allow_fp8_fallback=False)


def test_activation_checkpointing_keeps_state_dict_keys_and_gradients():
    torch.manual_seed(0)
    plain = build_model("HybridDiT-tiny")
    for module in plain.modules():  # leave the zero-init so that every block gets a gradient
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.05)
    wrapped = build_model("HybridDiT-tiny")
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped, (DiTBlock,))
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 3, 32), torch.ones(2, 3, dtype=torch.bool))
    for model in (plain, wrapped):
        model(*inputs).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), wrapped.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_the_shipped_configs_validate():
    for name in ("tiny-cpu", "hybriddit-148m", "hidit-stage1-tiny-cpu", "hidit-stage2-tiny-cpu"):
        assert load_config(TrainJobConfig, f"configs/train/{name}.yaml").run_name == name


def test_a_batch_that_does_not_split_over_the_workers_is_rejected():
    with pytest.raises(ConfigError, match="batch_size=10 is not divisible by scaling.num_workers=4"):
        load_config(TrainJobConfig, "configs/train/tiny-cpu.yaml", ["batch_size=10", "scaling.num_workers=4"])


def test_the_distillation_term_is_the_weighted_mse_to_the_teachers_velocity():
    from trainer.flow_matching import noise_batch
    from trainer.step import distillation_term

    model = build_model("HybridDiT-tiny")
    config, generator = model.config, torch.Generator().manual_seed(0)
    x0 = torch.randn(3, config.latent_channels, config.latent_size, config.latent_size, generator=generator)
    text, mask = torch.randn(3, 2, config.text_dim, generator=generator), torch.ones(3, 2, dtype=torch.bool)
    noised = noise_batch(x0, text, mask, generator=generator)
    prediction = model(noised.x_t, noised.t, noised.text, noised.text_mask)
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third sample is a placeholder
    assert float(distillation_term(prediction, model, noised, weights)) == 0.0
    silent = distillation_term(prediction, lambda x, t, text, mask: torch.zeros_like(x), noised, weights)
    expected = prediction.detach().pow(2).flatten(1).mean(dim=1)[:2].mean()
    assert float(silent) == pytest.approx(float(expected), rel=1e-5)
    assert silent.requires_grad  # the student learns from it; the teacher ran without gradients
