"""Every registered codec: shapes, normalisation, freezing, describe() round trip, input checks."""

from __future__ import annotations

import pytest
import torch

from services.encoders import CODECS, CodecError, EncoderError, build_codec
from services.encoders.diffusers_configs import DIFFUSERS_AUTOENCODERS


def test_registry_holds_the_designed_codecs():
    assert set(CODECS) == {
        "dc-ae-f32c32-sana-1.1",
        "flux1-vae",
        "sd-vae",
        "taef2",
        "taesana-encoder",
        "pixel",
    }


@pytest.mark.parametrize("name", sorted(CODECS))
def test_tiny_codec_encodes_a_batch_to_its_latent_shape_and_decodes_back_to_image_shape(name):
    codec = build_codec(name, tiny=True)
    images = torch.rand(2, 3, 64, 96)
    latents = codec.encode(images)
    assert latents.shape == (2, *codec.spec.latent_shape(64, 96))
    assert latents.dtype == torch.float32
    if codec.spec.has_decoder:
        assert codec.decode(latents).shape == images.shape


@pytest.mark.parametrize("name", sorted(CODECS))
def test_codec_rebuilt_from_describe_encodes_identically(name):
    codec = build_codec(name, tiny=True)
    rebuilt = build_codec(**codec.describe())
    images = torch.rand(1, 3, 64, 64)
    assert rebuilt.describe() == codec.describe()
    assert torch.equal(rebuilt.encode(images), codec.encode(images))


@pytest.mark.parametrize("name", ["dc-ae-f32c32-sana-1.1", "taef2"])
def test_codec_is_frozen_and_returns_ordinary_tensors(name):
    codec = build_codec(name, tiny=True)
    modules = [module for module in vars(codec).values() if isinstance(module, torch.nn.Module)]
    parameters = [parameter for module in modules for parameter in module.parameters()]
    assert parameters and not any(parameter.requires_grad for parameter in parameters)
    assert not any(module.training for module in modules)
    assert not codec.encode(torch.rand(1, 3, 32, 32)).is_inference()


def test_flux_vae_latents_are_shifted_then_scaled_by_its_config_values():
    codec = build_codec("flux1-vae", tiny=True)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        raw = codec.model.encode(images * 2 - 1).latent_dist.mode()
    assert (codec.spec.shift, codec.spec.scale) == (0.1159, 0.3611)
    torch.testing.assert_close(codec.encode(images), (raw - 0.1159) * 0.3611)


def test_bfloat16_request_on_cpu_runs_in_float32():
    codec = build_codec("sd-vae", tiny=True, dtype="bfloat16")
    assert codec.dtype == torch.float32
    assert next(codec.model.parameters()).dtype == torch.float32


def test_pixel_codec_round_trips_float_images_bit_exactly():
    codec = build_codec("pixel", factor=4)
    images = torch.rand(2, 3, 32, 48)
    assert torch.equal(codec.decode(codec.encode(images)), images)


def test_pixel_codec_round_trips_every_8_bit_value():
    codec = build_codec("pixel", factor=2)
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    decoded = codec.decode(codec.encode(pixels.float() / 255))
    assert torch.equal((decoded * 255).round().to(torch.uint8), pixels)


def test_pixel_codec_maps_unit_range_to_minus_one_one_in_space_to_depth_layout():
    codec = build_codec("pixel", factor=2)
    image = torch.zeros(1, 3, 2, 2)
    image[0, 0, 0, 1] = 1.0  # red channel, top-right pixel of the 2x2 patch
    latents = codec.encode(image)
    assert latents.shape == (1, 12, 1, 1)
    assert latents.flatten().tolist() == [-1, 1] + [-1] * 10


def test_encode_rejects_images_not_divisible_by_the_downscale_factor():
    codec = build_codec("pixel", factor=8)
    with pytest.raises(CodecError, match=r"\(30, 32\) is not divisible by its downscale factor 8"):
        codec.encode(torch.rand(1, 3, 30, 32))


def test_decode_rejects_latents_with_the_wrong_channel_count():
    codec = build_codec("taef2", tiny=True)
    with pytest.raises(CodecError, match=r"latents must be \(B, 32, h, w\), got \(1, 16, 4, 4\)"):
        codec.decode(torch.zeros(1, 16, 4, 4))


def test_unknown_codec_name_lists_the_known_ones():
    with pytest.raises(EncoderError, match="unknown codec 'vqgan'.*dc-ae-f32c32-sana-1.1"):
        build_codec("vqgan")


def test_unknown_codec_option_is_named_with_the_allowed_ones():
    with pytest.raises(
        EncoderError, match=r"'pixel': invalid options \(patch=4.*allowed options: \['factor'\]"
    ):
        build_codec("pixel", patch=4)


def test_unloadable_checkpoint_raises_codec_error_suggesting_alternatives(tmp_path):
    # An existing but empty local directory: diffusers fails without going to the network.
    with pytest.raises(CodecError, match="(?s)cannot load AutoencoderKL from .*tiny=True"):
        build_codec("sd-vae", hub_id=str(tmp_path))


@pytest.mark.parametrize(
    ("name", "millions"), [("dc-ae-f32c32-sana-1.1", 312.3), ("flux1-vae", 83.8), ("sd-vae", 83.7)]
)
def test_full_architecture_config_has_the_published_parameter_count(name, millions):
    import diffusers

    entry = DIFFUSERS_AUTOENCODERS[name]
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = getattr(diffusers, entry.model_class)(**entry.full_config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


@pytest.mark.slow
def test_full_dc_ae_architecture_encodes_512px_to_32x16x16_and_decodes_back():
    codec = build_codec("dc-ae-f32c32-sana-1.1", random_init=True)
    latents = codec.encode(torch.rand(1, 3, 512, 512))
    assert latents.shape == (1, 32, 16, 16)
    assert codec.decode(latents).shape == (1, 3, 512, 512)
