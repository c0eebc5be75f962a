"""The concrete image codecs: diffusers autoencoders, the shipped tiny autoencoders, lossless pixels."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from services.config import StrictModel
from services.encoders import tiny_autoencoders
from services.encoders.codec import Codec, CodecSpec
from services.encoders.diffusers_configs import DIFFUSERS_AUTOENCODERS, DiffusersAutoencoder
from services.encoders.errors import CodecError
from services.encoders.hub import from_pretrained_kwargs, revision_field
from services.encoders.runtime import freeze, parse_options, resolve_precision, seeded_init


class DiffusersCodecOptions(StrictModel):
    hub_id: str | None = Field(None, description="hub id or local directory; None = the published checkpoint")
    revision: str | None = revision_field("the commit registered for the published checkpoint")
    random_init: bool = Field(False, description="full architecture with seeded random weights, no download")


class PixelOptions(StrictModel):
    factor: int = Field(8, ge=1, description="space-to-depth factor: f x f pixels become 3*f*f channels")


class DiffusersCodec(Codec):
    """A diffusers autoencoder (AutoencoderDC or AutoencoderKL) that takes and gives images in [-1, 1]."""

    def __init__(self, model: nn.Module, **codec_args: Any):
        super().__init__(**codec_args)
        self.model = model

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.model.encode(images * 2 - 1)
        # The KL posterior's mode keeps cached latents deterministic; DC-AE is deterministic already.
        return encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return (self.model.decode(latents).sample + 1) / 2


def load_diffusers_model(entry: DiffusersAutoencoder, name: str, tiny: bool, options: DiffusersCodecOptions,
                         dtype: torch.dtype) -> nn.Module:  # fmt: skip
    import diffusers  # costs seconds: only when such a codec is built

    model_class = getattr(diffusers, entry.model_class)
    if tiny or options.random_init:
        with seeded_init():
            return model_class(**(entry.tiny_config if tiny else entry.full_config))
    hub_id, revision = options.hub_id or entry.hub.hub_id, options.revision
    kwargs = from_pretrained_kwargs(f"codec {name!r}", hub_id, revision)
    subfolder = entry.subfolder if options.hub_id is None else None
    try:
        return model_class.from_pretrained(hub_id, subfolder=subfolder, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise CodecError(
            f"codec {name!r}: cannot load {entry.model_class} from {hub_id!r} (subfolder {subfolder!r}, "
            f"revision {revision!r}, safetensors only): {exc}; pass hub_id=<local directory> for a downloaded "
            "copy, or tiny=True for a random tiny model"
        ) from exc


def build_diffusers_codec(name: str, tiny: bool, device: str | torch.device, dtype: torch.dtype | str,
                          **options: Any) -> Codec:  # fmt: skip
    entry = DIFFUSERS_AUTOENCODERS[name]
    parsed = parse_options(DiffusersCodecOptions, name, options)
    device, dtype = resolve_precision(device, dtype, f"codec {name!r}")
    if not (tiny or parsed.random_init):
        # Resolved into the options, so the manifest records the commit loaded and describe() rebuilds it.
        parsed = parsed.model_copy(update={"revision": entry.hub.pin(parsed.hub_id, parsed.revision)[1]})
    model = freeze(load_diffusers_model(entry, name, tiny, parsed, dtype), device, dtype)
    config = model.config
    block_channels = config.get("encoder_block_out_channels") or config["block_out_channels"]
    spec = CodecSpec(
        name=name,
        latent_channels=config["latent_channels"],
        downscale=2 ** (len(block_channels) - 1),
        scale=float(config["scaling_factor"]),
        shift=float(config.get("shift_factor") or 0.0),
        has_decoder=True,
        hub_id=parsed.hub_id or entry.hub.hub_id,
    )
    return DiffusersCodec(
        model, spec=spec, options=parsed.model_dump(), tiny=tiny, device=device, dtype=dtype
    )


@dataclass(frozen=True)
class TinyAutoencoder:
    """One shipped tiny autoencoder: module trees, weight files and the normalisation of its latents."""

    encoder: Callable[[], nn.Module]
    encoder_file: str
    decoder: Callable[[], nn.Module] | None
    decoder_file: str | None
    downscale: int
    shift: float
    scale: float
    decoder_alternative: str = ""


TINY_AUTOENCODERS = {
    # Raw taef2 latents over 10 scikit-image photos (astronaut, coffee, chelsea, rocket, camera, cat,
    # immunohistochemistry, coins, moon, page; centre crops) had mean +0.007 / -0.005 and std 0.851 / 0.819
    # at 256 / 512 px: shift 0 and scale 1 / 0.835 give unit variance.
    "taef2": TinyAutoencoder(
        tiny_autoencoders.taef2_encoder, "taef2_encoder.safetensors",
        tiny_autoencoders.taef2_decoder, "taef2_decoder.safetensors",
        downscale=8, shift=0.0, scale=1.2,
    ),
    # TAESD-family encoders emit latents already in their target's scaled space (measured the same way:
    # mean 0.04, std 0.87 / 0.83 at 256 / 512 px), so scale 1 keeps them interchangeable with the
    # normalised latents of dc-ae-f32c32-sana-1.1, whose decoder can then decode them.
    "taesana-encoder": TinyAutoencoder(
        tiny_autoencoders.taesana_encoder, "taesana_encoder.safetensors", None, None,
        downscale=32, shift=0.0, scale=1.0,
        decoder_alternative="its latents approximate the normalised latents of 'dc-ae-f32c32-sana-1.1': "
        "decode them with build_codec('dc-ae-f32c32-sana-1.1')",
    ),
}  # fmt: skip


class TinyAutoencoderCodec(Codec):
    """A TAESD-family autoencoder: images in [0, 1] straight in, decoder output in [0, 1]."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None, **codec_args: Any):
        super().__init__(**codec_args)
        self.encoder = encoder
        self.decoder = decoder

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)


def build_tiny_autoencoder_codec(name: str, tiny: bool, device: str | torch.device, dtype: torch.dtype | str,
                                 **options: Any) -> Codec:  # fmt: skip
    """tiny=False loads the shipped weights; tiny=True keeps the (already small) tree with seeded random weights."""
    entry = TINY_AUTOENCODERS[name]
    parsed = parse_options(StrictModel, name, options)
    device, dtype = resolve_precision(device, dtype, f"codec {name!r}")

    def make(factory: Callable[[], nn.Module], file_name: str) -> nn.Module:
        with seeded_init():
            module = factory()
        if not tiny:
            tiny_autoencoders.load_pretrained(module, file_name)
        return freeze(module, device, dtype)

    encoder = make(entry.encoder, entry.encoder_file)
    decoder = make(entry.decoder, entry.decoder_file) if entry.decoder else None
    spec = CodecSpec(
        name=name,
        latent_channels=tiny_autoencoders.LATENT_CHANNELS,
        downscale=entry.downscale,
        scale=entry.scale,
        shift=entry.shift,
        has_decoder=decoder is not None,
    )
    return TinyAutoencoderCodec(
        encoder, decoder, spec=spec, options=parsed.model_dump(), tiny=tiny, device=device, dtype=dtype,
        decoder_alternative=entry.decoder_alternative,
    )  # fmt: skip


class PixelCodec(Codec):
    """Lossless space-to-depth: f x f pixel patches become channels, values mapped to [-1, 1]."""

    def encode_raw(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.spec.downscale)

    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.spec.downscale)


def build_pixel_codec(name: str, tiny: bool, device: str | torch.device, dtype: torch.dtype | str,
                      **options: Any) -> Codec:  # fmt: skip
    """Always fp32 (any requested dtype is ignored): pixels must round-trip exactly."""
    parsed = parse_options(PixelOptions, name, options)
    # Stored value = (pixel - 0.5) * 2, i.e. [0, 1] -> [-1, 1], through the shared shift/scale path.
    spec = CodecSpec(name=name, latent_channels=3 * parsed.factor**2, downscale=parsed.factor,
                     scale=2.0, shift=0.5, has_decoder=True)  # fmt: skip
    return PixelCodec(spec=spec, options=parsed.model_dump(), tiny=tiny, device=torch.device(device),
                      dtype=torch.float32)  # fmt: skip


CODECS: dict[str, Callable[..., Codec]] = {
    "dc-ae-f32c32-sana-1.1": build_diffusers_codec,
    "flux1-vae": build_diffusers_codec,
    "sd-vae": build_diffusers_codec,
    "taef2": build_tiny_autoencoder_codec,
    "taesana-encoder": build_tiny_autoencoder_codec,
    "pixel": build_pixel_codec,
}
DEFAULT_CODEC = "dc-ae-f32c32-sana-1.1"
