"""The image codec interface: [0, 1] images <-> latents normalised by the codec's shift and scale."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.encoders.errors import CodecError


@dataclass(frozen=True)
class CodecSpec:
    """What the latent cache records about a codec: latent layout and its normalisation."""

    name: str
    latent_channels: int
    downscale: int
    scale: float
    shift: float
    has_decoder: bool
    hub_id: str | None = None

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return self.latent_channels, height // self.downscale, width // self.downscale


class Codec:
    """A frozen image codec; subclasses supply the raw encoder and decoder."""

    def __init__(
        self,
        spec: CodecSpec,
        options: dict[str, Any],
        tiny: bool,
        device: torch.device,
        dtype: torch.dtype,
        decoder_alternative: str = "",
    ):
        self.spec = spec
        self.options = options
        self.tiny = tiny
        self.device = device
        self.dtype = dtype
        # Said when decode is asked of a codec without decoder: what to decode its latents with instead.
        self.decoder_alternative = decoder_alternative

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] on the codec's device and dtype -> raw latents."""
        raise NotImplementedError

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Raw latents -> (B, 3, H, W) images, roughly in [0, 1]; only codecs with a decoder."""
        raise NotImplementedError

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, C, H/f, W/f) fp32 latents, normalised as (raw - shift) * scale."""
        self.check_images(images)
        with torch.inference_mode():
            raw = self.encode_raw(images.to(self.device, self.dtype)).float()
            latents = (raw - self.spec.shift) * self.spec.scale
        # A clone outside inference mode is an ordinary tensor that autograd code may use.
        return latents.clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> (B, 3, H, W) fp32 images in [0, 1]."""
        if not self.spec.has_decoder:
            raise CodecError(f"codec {self.spec.name!r} has no decoder; {self.decoder_alternative}")
        self.check_latents(latents)
        with torch.inference_mode():
            raw = latents.to(self.device, torch.float32) / self.spec.scale + self.spec.shift
            images = self.decode_raw(raw.to(self.dtype)).float().clamp(0, 1)
        return images.clone()

    def describe(self) -> dict[str, Any]:
        """JSON-able options; `build_codec(**codec.describe())` rebuilds the same codec."""
        return {"name": self.spec.name, "tiny": self.tiny, **self.options}

    def check_images(self, images: torch.Tensor) -> None:
        factor = self.spec.downscale
        if images.ndim != 4 or images.shape[1] != 3:
            raise CodecError(
                f"codec {self.spec.name!r}: images must be (B, 3, H, W), got {tuple(images.shape)}"
            )
        if images.shape[2] % factor or images.shape[3] % factor:
            raise CodecError(
                f"codec {self.spec.name!r}: image size {tuple(images.shape[2:])} is not divisible by its "
                f"downscale factor {factor}; resize or crop to a multiple of {factor}"
            )

    def check_latents(self, latents: torch.Tensor) -> None:
        channels = self.spec.latent_channels
        if latents.ndim != 4 or latents.shape[1] != channels:
            raise CodecError(
                f"codec {self.spec.name!r}: latents must be (B, {channels}, h, w), got {tuple(latents.shape)}"
            )
