"""Module trees of the pretrained tiny autoencoders (TAESD family) that load the shipped safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from services.encoders.errors import CodecError

TINY_AE_DIR_ENV = "HYBRIDDIT_TINY_AE_DIR"
# Package data of `services.encoders` (see pyproject.toml), so that an installed wheel carries them too.
SHIPPED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights" / "tiny_autoencoders"
WIDTH = 64
LATENT_CHANNELS = 32


def conv(channels_in: int, channels_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=bias)


class Block(nn.Module):
    """Residual conv block; taef2's mid blocks first add a 1x1 channel-mixing `pool` branch."""

    def __init__(self, channels: int = WIDTH, pooled: bool = False):
        super().__init__()
        if pooled:
            self.pool = nn.Sequential(
                nn.Conv2d(channels, 4 * channels, 1, bias=False),
                nn.GroupNorm(4, 4 * channels),
                nn.ReLU(),
                nn.Conv2d(4 * channels, channels, 1, bias=False),
            )
        self.conv = nn.Sequential(
            conv(channels, channels), nn.ReLU(), conv(channels, channels), nn.ReLU(), conv(channels, channels)
        )
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pool"):
            x = x + self.pool(x)
        return self.fuse(self.conv(x) + self.skip(x))


class SoftClamp(nn.Module):
    """Bounds latents smoothly to (-3, 3) before decoding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def downsample() -> nn.Conv2d:
    return conv(WIDTH, WIDTH, stride=2, bias=False)


def taef2_encoder() -> nn.Sequential:
    """TAEF2 encoder: image in [0, 1] -> 32-channel latent at 1/8 resolution (approximates the FLUX.2 VAE)."""
    return nn.Sequential(
        conv(3, WIDTH),
        Block(),
        downsample(), Block(), Block(), Block(),
        downsample(), Block(), Block(), Block(),
        downsample(), Block(pooled=True), Block(pooled=True), Block(pooled=True),
        conv(WIDTH, LATENT_CHANNELS),
    )  # fmt: skip


def taef2_decoder() -> nn.Sequential:
    """TAEF2 decoder: 32-channel latent -> image at 8x resolution."""

    def upsample_stage(blocks: int) -> list[nn.Module]:
        return [
            nn.Upsample(scale_factor=2),
            conv(WIDTH, WIDTH, bias=False),
            *(Block() for _ in range(blocks)),
        ]

    return nn.Sequential(
        SoftClamp(),
        conv(LATENT_CHANNELS, WIDTH),
        nn.ReLU(),
        Block(pooled=True), Block(pooled=True), Block(pooled=True),
        *upsample_stage(3),
        *upsample_stage(3),
        *upsample_stage(1),
        conv(WIDTH, 3),
    )  # fmt: skip


def taesana_encoder() -> nn.Sequential:
    """TAESana encoder: image in [0, 1] -> 32-channel latent at 1/32 resolution (approximates DC-AE f32c32)."""
    return nn.Sequential(
        conv(3, 32, stride=2),
        nn.ReLU(),
        conv(32, WIDTH, stride=2),
        nn.ReLU(),
        Block(),
        downsample(), Block(), Block(), Block(),
        downsample(), Block(), Block(), Block(),
        downsample(), Block(), Block(), Block(),
        conv(WIDTH, LATENT_CHANNELS),
    )  # fmt: skip


def tiny_autoencoder_dir() -> Path:
    """Directory of the weights: $HYBRIDDIT_TINY_AE_DIR when set, else the ones shipped in this package."""
    configured = os.environ.get(TINY_AE_DIR_ENV)
    return Path(configured) if configured else SHIPPED_WEIGHTS_DIR


def load_pretrained(module: nn.Module, file_name: str) -> nn.Module:
    """Fill `module` from `<tiny autoencoder dir>/<file_name>`, every key matching exactly."""
    path = tiny_autoencoder_dir() / file_name
    if not path.is_file():
        raise CodecError(
            f"tiny autoencoder weights {path} not found; set {TINY_AE_DIR_ENV} to the directory holding "
            f"{file_name}, or build the codec with tiny=True for random weights"
        )
    module.load_state_dict(load_file(path), strict=True)
    return module
