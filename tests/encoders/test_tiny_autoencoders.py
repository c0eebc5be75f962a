"""The shipped tiny autoencoders on real photos: reconstruction quality, latent layout, missing weights."""

from __future__ import annotations

import pytest
import torch

from services.encoders import CodecError, build_codec
from services.encoders.tiny_autoencoders import TINY_AE_DIR_ENV


def psnr(reference: torch.Tensor, estimate: torch.Tensor) -> torch.Tensor:
    """Per-image peak signal-to-noise ratio in dB for images in [0, 1]."""
    mse = ((reference - estimate) ** 2).flatten(1).mean(1)
    return -10 * torch.log10(mse)


def test_taef2_reconstructs_astronaut_coffee_chelsea_at_256px_above_25_db(photos_256):
    codec = build_codec("taef2")
    reconstructed = codec.decode(codec.encode(photos_256))
    scores = psnr(photos_256, reconstructed)
    assert scores.min() >= 25.0, f"PSNR per photo: {scores.tolist()}"


def test_taef2_latents_are_normalised_to_about_unit_variance(photos_256):
    latents = build_codec("taef2").encode(photos_256)
    assert 0.8 < latents.std().item() < 1.25
    assert abs(latents.mean().item()) < 0.1


def test_taesana_encoder_gives_32_channels_at_one_32nd_of_the_image_size(photos_256):
    images = torch.cat([photos_256, photos_256], dim=3)  # (3, 3, 256, 512)
    latents = build_codec("taesana-encoder").encode(images)
    assert latents.shape == (3, 32, 8, 16)
    assert torch.isfinite(latents).all()


def test_taesana_decode_raises_codec_error_naming_the_decoder_to_use_instead():
    codec = build_codec("taesana-encoder", tiny=True)
    with pytest.raises(CodecError, match="has no decoder.*dc-ae-f32c32-sana-1.1"):
        codec.decode(torch.zeros(1, 32, 2, 2))


def test_missing_weight_directory_raises_codec_error_naming_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(TINY_AE_DIR_ENV, str(missing))
    with pytest.raises(CodecError, match=str(missing / "taef2_encoder.safetensors")):
        build_codec("taef2")
