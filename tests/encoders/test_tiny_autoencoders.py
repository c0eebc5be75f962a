"""The shipped tiny autoencoders: the files themselves, where they load from, reconstruction on real photos."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.encoders import CodecError, build_codec
from services.encoders.tiny_autoencoders import SHIPPED_WEIGHTS_DIR, TINY_AE_DIR_ENV, tiny_autoencoder_dir

# Recorded when the weights were added to the package (converted unchanged from the published state dicts).
SHIPPED_SHA256 = {
    "taef2_encoder.safetensors": "ed439d4f19057d2a3b8fb43e3caa9aff37f5b9fdbf707cddff57f5a8ae8d5068",
    "taef2_decoder.safetensors": "79b69df8dd742e179d3b929905310a39901a805840f9b2b8968d1bbf5f65d642",
    "taesana_encoder.safetensors": "44f441ed65c5d2774223d40801c9accf6fe8de2cdbb81fc05f8cf4a7ad25e867",
    "LICENSE.taesd": "261497cf8e9ed613ed1fa5ddf48af32cdf50545b2ccd9edd7eacc91fb9255d6e",
}


def test_shipped_weights_and_licence_match_their_recorded_sha256():
    shipped = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in SHIPPED_WEIGHTS_DIR.iterdir()}
    assert shipped.pop("README.md", None) is not None, "the weights' provenance README is missing"
    assert shipped == SHIPPED_SHA256


def test_without_the_environment_variable_the_codecs_load_the_weights_inside_the_package(monkeypatch):
    monkeypatch.delenv(TINY_AE_DIR_ENV, raising=False)
    package_dir = SHIPPED_WEIGHTS_DIR.parents[1]
    assert tiny_autoencoder_dir() == SHIPPED_WEIGHTS_DIR and (package_dir / "tiny_autoencoders.py").is_file()
    codec = build_codec("taef2")
    for module, file_name in ((codec.encoder, "taef2_encoder.safetensors"), (codec.decoder, "taef2_decoder.safetensors")):
        expected = load_file(SHIPPED_WEIGHTS_DIR / file_name)
        loaded = module.state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[name], expected[name]) for name in expected), file_name
    assert torch.isfinite(build_codec("taesana-encoder").encode(torch.rand(1, 3, 64, 64))).all()


def test_the_environment_variable_points_the_codecs_at_another_weight_directory(tmp_path, monkeypatch):
    shutil.copy(SHIPPED_WEIGHTS_DIR / "taef2_decoder.safetensors", tmp_path)
    halved = {name: tensor / 2 for name, tensor in load_file(SHIPPED_WEIGHTS_DIR / "taef2_encoder.safetensors").items()}
    save_file(halved, tmp_path / "taef2_encoder.safetensors")
    monkeypatch.setenv(TINY_AE_DIR_ENV, str(tmp_path))
    loaded = build_codec("taef2").encoder.state_dict()
    assert all(torch.equal(loaded[name], halved[name]) for name in halved)


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
