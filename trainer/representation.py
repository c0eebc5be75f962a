"""Frozen image encoders for REPA (representation alignment), behind one registry: name -> encoder.

An encoder maps clean images in [0, 1] (B, 3, H, W) to patch features resampled to the DiT's token grid
(B, h*w, dim). DINOv2 loads with `from_pretrained` from a local directory or from the Hugging Face cache that
`hf download <id>` fills (safetensors only); a job never downloads it, so a missing copy is a clear error naming
the weights. `tiny-dinov2` is a seeded random DINOv2 for tests.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.attention import Grid, grid_to_image

logger = logging.getLogger(__name__)

# ImageNet statistics, which DINOv2 was trained with
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """A feature encoder whose weights are not on this machine."""


class FeatureEncoder(nn.Module):
    """A frozen ViT's patch tokens (CLS dropped), from images resized to `resolution`, resampled to a token grid."""

    def __init__(self, name: str, vit: nn.Module, resolution: int):
        super().__init__()
        self.name, self.resolution = name, resolution
        self.vit = vit.eval().requires_grad_(False)
        self.dim = vit.config.hidden_size
        self.patch = vit.config.patch_size
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: Grid) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, h*w, dim) features on the DiT's token grid."""
        size = (self.resolution, self.resolution)
        images = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        tokens = self.vit(pixel_values=(images - self.mean) / self.std).last_hidden_state[:, 1:]  # (B, n*n, dim)
        side = self.resolution // self.patch
        feature_map = tokens.transpose(1, 2).reshape(tokens.shape[0], self.dim, side, side)
        if feature_map.shape[-2:] != tuple(grid):
            feature_map = F.interpolate(feature_map, size=grid, mode="bilinear", align_corners=False)
        return grid_to_image(feature_map)


def _dinov2(source: str) -> FeatureEncoder:
    from transformers import Dinov2Model

    try:
        # local_files_only: a job reads the copy downloaded beforehand (or a directory), never the network
        vit = Dinov2Model.from_pretrained(source, local_files_only=True, use_safetensors=True)
    except OSError as error:
        where = "the directory" if Path(source).is_dir() else "this machine's Hugging Face cache"
        raise MissingWeightsError(
            f"REPA encoder {source!r}: its weights are not in {where} ({error.__class__.__name__}): download "
            f"them first (`hf download {source}`, safetensors), or set repa.encoder to a local directory holding "
            "a DINOv2 model, or unset repa") from error
    return FeatureEncoder(source, vit, resolution=224)


def _tiny_dinov2(source: str) -> FeatureEncoder:
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=28, patch_size=14)
    return FeatureEncoder(source, Dinov2Model(config), resolution=28)


FEATURE_ENCODERS: dict[str, Callable[[str], FeatureEncoder]] = {
    "facebook/dinov2-small": _dinov2,
    "facebook/dinov2-base": _dinov2,
    "facebook/dinov2-large": _dinov2,
    "facebook/dinov2-giant": _dinov2,
    "tiny-dinov2": _tiny_dinov2,
}


def build_feature_encoder(name: str, device: torch.device | str = "cpu") -> FeatureEncoder:
    """A registered encoder, or a local directory holding a DINOv2 model, frozen on `device`."""
    if name in FEATURE_ENCODERS:
        build = FEATURE_ENCODERS[name]
    elif Path(name).is_dir():
        build = _dinov2
    else:
        raise KeyError(f"unknown REPA encoder {name!r}: use one of {', '.join(FEATURE_ENCODERS)} or a local "
                       "directory holding a DINOv2 model")
    encoder = build(name).to(device)
    logger.info("REPA encoder %s: %d-d features at %d px", name, encoder.dim, encoder.resolution)
    return encoder
