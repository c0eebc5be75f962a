"""The DiT family: config + presets, and `build_model(preset_or_config)`."""

from __future__ import annotations

from trainer.models.config import DEFAULT_PRESET, MODEL_PRESETS, DiTConfig, resolve_config
from trainer.models.hybrid_dit import HybridDiT


def build_model(preset_or_config: str | DiTConfig | dict = DEFAULT_PRESET) -> HybridDiT:
    """A preset name, config or config dict -> an fp32 model with its initial (zero-output) weights."""
    return HybridDiT(resolve_config(preset_or_config))


__all__ = ["DEFAULT_PRESET", "MODEL_PRESETS", "DiTConfig", "HybridDiT", "build_model", "resolve_config"]
