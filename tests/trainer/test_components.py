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
    for name in ("tiny-cpu", "hybriddit-148m", "lit-tiny-cpu", "hidit-stage1-tiny-cpu", "hidit-stage2-tiny-cpu"):
        assert load_config(TrainJobConfig, f"configs/train/{name}.yaml").run_name == name


def test_a_batch_that_does_not_split_over_the_workers_is_rejected():
    with pytest.raises(ConfigError, match="batch_size=10 is not divisible by scaling.num_workers=4"):
        load_config(TrainJobConfig, "configs/train/tiny-cpu.yaml", ["batch_size=10", "scaling.num_workers=4"])


def distillation_case(student_seed: int, teacher_seed: int):
    """A student and a teacher (LiT-T2I-tiny, non-zero weights from the given seeds) and one noised batch."""
    from tests.model.model_helpers import randomize_weights
    from trainer.flow_matching import noise_batch

    student = randomize_weights(build_model("LiT-T2I-tiny"), seed=student_seed)
    teacher = randomize_weights(build_model("LiT-T2I-tiny"), seed=teacher_seed).requires_grad_(False)
    config, generator = student.config, torch.Generator().manual_seed(0)
    x0 = torch.randn(3, config.latent_channels, config.latent_size, config.latent_size, generator=generator)
    text, mask = torch.randn(3, 2, config.text_dim, generator=generator), torch.ones(3, 2, dtype=torch.bool)
    noised = noise_batch(x0, text, mask, generator=generator)
    return student, teacher, noised


def test_both_distillation_terms_are_exactly_zero_when_the_student_is_the_teacher():
    from trainer.step import distillation_terms

    student, teacher, noised = distillation_case(1, 1)
    prediction = student(noised.x_t, noised.t, noised.text, noised.text_mask)
    terms = distillation_terms(prediction, teacher, noised, torch.ones(3))
    assert terms.noise.item() == 0.0 and terms.variance.item() == 0.0


def test_the_distillation_terms_are_the_velocity_mse_and_the_mse_of_per_channel_error_variances():
    from trainer.step import distillation_terms

    student, teacher, noised = distillation_case(1, 2)
    prediction = student(noised.x_t, noised.t, noised.text, noised.text_mask)
    weights = torch.tensor([1.0, 1.0, 0.0])  # the third sample is a placeholder
    terms = distillation_terms(prediction, teacher, noised, weights)
    prediction, taught = prediction.detach(), teacher(noised.x_t, noised.t, noised.text, noised.text_mask)
    student_var = (prediction - noised.target).pow(2).mean(dim=(2, 3))  # (B, C)
    teacher_var = (taught - noised.target).pow(2).mean(dim=(2, 3))
    noise, variance = terms.noise.item(), terms.variance.item()
    assert noise == pytest.approx((prediction - taught).pow(2).mean(dim=(1, 2, 3))[:2].mean().item(), rel=1e-5)
    assert variance == pytest.approx((student_var - teacher_var).pow(2).mean(dim=1)[:2].mean().item(), rel=1e-5)
    assert noise > 0 and variance > 0


def test_the_distillation_terms_train_the_student_and_never_the_teacher():
    from trainer.step import distillation_terms

    student, teacher, noised = distillation_case(1, 2)
    teacher.requires_grad_(True)  # even a teacher left trainable gets no gradient: it runs under no_grad
    for term in ("noise", "variance"):
        student.zero_grad(set_to_none=True)
        prediction = student(noised.x_t, noised.t, noised.text, noised.text_mask)
        getattr(distillation_terms(prediction, teacher, noised, torch.ones(3)), term).backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters()), term
        assert all(p.grad is None for p in teacher.parameters()), term


def test_the_objective_adds_lambda1_noise_and_lambda2_variance_to_flow_matching():
    from trainer.flow_matching import noise_batch
    from trainer.step import Objective, distillation_terms, flow_matching_term

    student, teacher, _ = distillation_case(1, 2)
    config = TrainJobConfig.model_validate(dict(
        data=dict(uris=["file:///cache"]), checkpoint=dict(uri="file:///ckpt"), max_steps=1, cfg_dropout=0.0,
        distill_noise_lambda=0.7, distill_var_lambda=0.3))
    model = student.config
    batch = {"latent": torch.randn(3, model.latent_channels, model.latent_size, model.latent_size),
             "text": torch.randn(3, 2, model.text_dim), "text_mask": torch.ones(3, 2, dtype=torch.bool),
             "weights": torch.ones(3)}
    objective = Objective(config, None, teacher, model_config=model)
    loss = objective.loss(student, batch, torch.Generator().manual_seed(5))
    noised = noise_batch(batch["latent"], batch["text"], batch["text_mask"], sampling=config.timesteps,
                         generator=torch.Generator().manual_seed(5), patch_size=model.patch_size)
    prediction = student(noised.x_t, noised.t, noised.text, noised.text_mask)
    terms = distillation_terms(prediction, teacher, noised, batch["weights"])
    expected = flow_matching_term(prediction, noised, batch["weights"]) + 0.7 * terms.noise + 0.3 * terms.variance
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_the_paper_lambdas_are_the_defaults():
    config = load_config(TrainJobConfig, "configs/train/tiny-cpu.yaml")
    assert (config.distill_noise_lambda, config.distill_var_lambda) == (0.5, 0.05)
