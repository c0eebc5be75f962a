"""Tiny cache samples shaped like the real thing: latents (C, h, w) and T5-like text states (L, D)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from services.cache.schema import CacheSample


def hidden_states(rng: np.random.Generator, tokens: int, dim: int) -> np.ndarray:
    """Text-encoder-like states: channels of very different scale, a few outliers, per-token norm drift."""
    channel_scale = rng.lognormal(mean=-1.5, sigma=0.6, size=dim)
    channel_scale[rng.choice(dim, size=max(1, dim // 100), replace=False)] *= 6.0
    token_scale = rng.uniform(0.6, 1.4, size=(tokens, 1))
    return (rng.standard_normal((tokens, dim)) * channel_scale * token_scale).astype(np.float32)


@pytest.fixture
def encoder_like_states() -> Callable[[np.random.Generator, int, int], np.ndarray]:
    return hidden_states


@pytest.fixture
def make_sample() -> Callable[..., CacheSample]:
    def make(key: str, *, latent_shape=(4, 8, 8), tokens=7, dim=16, seed=0) -> CacheSample:
        rng = np.random.default_rng(seed)
        return CacheSample(
            key=key,
            latent=rng.standard_normal(latent_shape).astype(np.float32),
            text=hidden_states(rng, tokens, dim),
            caption=f"caption of {key} – ünïcödé",
            meta={"source_id": key, "aesthetic": 5.5},
        )

    return make
