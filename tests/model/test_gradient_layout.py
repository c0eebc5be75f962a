"""Every parameter's gradient is laid out like the parameter, as DDP's gradient buckets expect."""

from __future__ import annotations

import pytest
import torch

from trainer.models import MODEL_PRESETS, build_model

TINY_PRESETS = [name for name in MODEL_PRESETS if name.endswith("-tiny")]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_every_gradient_has_the_strides_of_its_parameter(preset):
    # DDP warns "Grad strides do not match bucket view strides" for each parameter that breaks this.
    torch.manual_seed(0)
    model = build_model(preset)
    config = model.config
    latents = torch.randn(2, config.latent_channels, config.latent_size, config.latent_size)
    text = torch.randn(2, config.text_len, config.text_dim)
    model(latents, torch.rand(2), text, torch.ones(2, config.text_len, dtype=torch.bool)).square().mean().backward()
    mismatched = {name: (tuple(parameter.stride()), tuple(parameter.grad.stride()))
                  for name, parameter in model.named_parameters()
                  if parameter.grad is not None and parameter.grad.stride() != parameter.stride()}  # fmt: skip
    assert mismatched == {}, "parameter -> (its strides, its gradient's strides)"
    assert sum(parameter.grad is not None for parameter in model.parameters()) > 0
