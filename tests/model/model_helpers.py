"""Helpers for the model tests: tiny presets, random captions with padding, non-zero weights."""

from __future__ import annotations

import torch

from trainer.models import MODEL_PRESETS

TINY_PRESETS = [name for name in MODEL_PRESETS if name.endswith("-tiny")]


def randomize_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones too) a random value, so every path is active."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def random_inputs(config, batch: int = 2, text_len: int = 6, seed: int = 0, size: tuple[int, int] | None = None):
    """(x, t, text, mask) for `config`; sample i has `text_len - i` real tokens then padding."""
    generator = torch.Generator().manual_seed(seed)
    height, width = size or (config.latent_size, config.latent_size)
    x = torch.randn(batch, config.latent_channels, height, width, generator=generator)
    t = torch.rand(batch, generator=generator)
    text = torch.randn(batch, text_len, config.text_dim, generator=generator)
    lengths = torch.tensor([text_len - i for i in range(batch)])
    mask = torch.arange(text_len)[None, :] < lengths[:, None]
    return x, t, text, mask
