"""Preprocessing on real photos and real broken files: reasons, orientation, modes, buckets, crop records."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from pipelines.preprocess import (
    PreprocessConfig,
    SampleRejected,
    choose_bucket,
    clean_caption,
    prepare_image,
    to_rgb,
)
from pipelines.sources import FolderConfig, build_source
from tests.fixtures.corpora import (
    encode,
    jpeg_with_orientation,
    make_bad_input_corpus,
    photo_jpeg,
    photo_pixels,
    png_header_only,
    reasons_by_key,
)

SQUARE_64 = PreprocessConfig(resolution=64, multiple_of=32)
BUCKETS = PreprocessConfig(buckets=[(64, 64), (96, 64), (64, 96)], multiple_of=32)


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def test_square_crop_of_landscape_photo_records_original_size_and_centred_box():
    prepared = prepare_image(photo_jpeg("rocket"), SQUARE_64)  # 640 x 427

    assert prepared.pixels.shape == (64, 64, 3) and prepared.pixels.dtype == np.uint8
    assert prepared.original_size == (640, 427)
    assert prepared.crop_box == (106, 0, 533, 427)
    assert prepared.bucket == (64, 64)


def test_pixels_equal_a_full_resolution_crop_and_resize_of_the_recorded_box():
    jpeg = photo_jpeg("grace_hopper")  # 512 x 600, decoded at reduced scale through JPEG draft mode
    prepared = prepare_image(jpeg, SQUARE_64)
    reference = Image.open(io.BytesIO(jpeg)).convert("RGB").crop(prepared.crop_box)
    reference = np.array(reference.resize((64, 64), Image.Resampling.LANCZOS))

    assert prepared.crop_box == (0, 44, 512, 556)
    assert mean_abs_difference(prepared.pixels, reference) < 4.0


def test_exif_orientation_is_applied_before_cropping():
    stored = photo_pixels("chelsea")  # 451 x 300 stored; orientation 6 displays it rotated clockwise
    prepared = prepare_image(jpeg_with_orientation(stored, 6), SQUARE_64)
    upright = prepare_image(encode(np.rot90(stored, k=-1).copy(), "JPEG", quality=95), SQUARE_64)

    assert prepared.original_size == (300, 451)
    assert mean_abs_difference(prepared.pixels, upright.pixels) < 4.0
    assert (
        mean_abs_difference(prepared.pixels, prepare_image(encode(stored, "JPEG"), SQUARE_64).pixels) > 20.0
    )


def test_bucket_choice_compares_aspect_ratios_in_log_space():
    # Aspect 1.45 is nearer 1:1 on a linear scale but nearer 2:1 in log space (log 1.45 > log 2 / 2).
    assert choose_bucket(145, 100, [(32, 32), (64, 32)]) == (64, 32)
    assert choose_bucket(100, 145, [(32, 32), (32, 64)]) == (32, 64)


def test_landscape_and_portrait_photos_land_in_matching_buckets():
    landscape = prepare_image(photo_jpeg("rocket"), BUCKETS)  # 640 x 427, aspect 1.50
    portrait = prepare_image(photo_jpeg("grace_hopper"), BUCKETS)  # 512 x 600, aspect 0.85

    assert landscape.bucket == (96, 64) and landscape.pixels.shape == (64, 96, 3)
    assert landscape.crop_box == (0, 0, 640, 427)
    assert portrait.bucket == (64, 64) and portrait.pixels.shape == (64, 64, 3)


@pytest.mark.parametrize(
    "settings",
    [{"resolution": 100, "multiple_of": 32}, {"buckets": [(96, 50)], "multiple_of": 32}, {"buckets": []}],
)
def test_config_rejects_sizes_the_codec_cannot_encode(settings):
    with pytest.raises(ValidationError):
        PreprocessConfig(**settings)


def test_header_above_max_pixels_is_rejected_before_pixels_are_decoded():
    # The file holds no pixel data for 9000 x 9000: decoding would fail as truncated, not as a bomb.
    with pytest.raises(SampleRejected) as rejected:
        prepare_image(png_header_only(9000, 9000), SQUARE_64)

    assert rejected.value.reason == "decompression_bomb"


def test_max_pixels_setting_applies_to_real_photos():
    with pytest.raises(SampleRejected) as rejected:
        prepare_image(photo_jpeg("astronaut"), PreprocessConfig(resolution=64, max_pixels=100_000))

    assert rejected.value.reason == "decompression_bomb"


def test_transparent_pixels_are_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red under full transparency must not show
    assert np.array(to_rgb(Image.fromarray(rgba, "RGBA"))).tolist() == np.full((4, 4, 3), 255).tolist()


def test_palette_transparency_index_becomes_white():
    palette = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    palette.putpalette([10, 20, 30, 40, 50, 60])
    palette.info["transparency"] = 0

    assert np.array(to_rgb(palette)).tolist() == [[[255, 255, 255], [40, 50, 60]]]


def test_sixteen_bit_grey_is_scaled_to_eight_bits():
    grey16 = Image.fromarray(np.array([[0, 257 * 128, 65535]], np.uint16))

    assert grey16.mode.startswith("I;16")
    assert np.array(to_rgb(grey16))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "LA", "I", "YCbCr"])
def test_every_pillow_mode_becomes_rgb(mode):
    image = Image.fromarray(photo_pixels("coffee")[:64, :64]).convert(mode)

    assert to_rgb(image).mode == "RGB"


def test_bad_input_corpus_drops_each_sample_for_its_reason(tmp_path):
    expected = make_bad_input_corpus(tmp_path)

    reasons = reasons_by_key(build_source(FolderConfig(root=str(tmp_path))), SQUARE_64)

    assert reasons == expected
    assert Counter(reasons.values()) == {
        None: 6,
        "missing_caption": 2,
        "empty_file": 1,
        "truncated": 1,
        "decode_error": 1,
        "too_small": 1,
        "decompression_bomb": 1,
        "bad_caption_encoding": 1,
    }


def test_clean_caption_collapses_whitespace_and_drops_a_byte_order_mark():
    assert clean_caption("\ufeffa  cat\n on\ta mat ".encode()) == "a cat on a mat"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"caf\xe9", "bad_caption_encoding"),
        (b" \n ", "missing_caption"),
        ("", "missing_caption"),
        (None, "missing_caption"),
    ],
)
def test_clean_caption_rejects_undecodable_or_empty_text(raw, reason):
    with pytest.raises(SampleRejected) as rejected:
        clean_caption(raw)

    assert rejected.value.reason == reason
