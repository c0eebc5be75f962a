"""`output.store_pixels`: the encode job keeps each sample's preprocessed pixels beside its latent, and what it costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.config import EncodeJobConfig
from pipelines.demo.corpus import load_digit_split, write_digit_class_folders
from pipelines.local_loop import run_local
from pipelines.preprocess import prepare_image
from services.cache.manifest import read_manifest, shard_uris
from services.cache.reader import SkipCounter, read_samples
from services.config import load_config

REPO = Path(__file__).resolve().parents[2]
DIGITS = 60


@pytest.fixture(scope="module")
def digit_classes(tmp_path_factory) -> Path:
    split = load_digit_split()
    root = tmp_path_factory.mktemp("digits")
    write_digit_class_folders(root, split.train_ink[:DIGITS], split.train_labels[:DIGITS], size=64)
    return root


def hidit_job(root: Path, out: Path, store_pixels: bool) -> EncodeJobConfig:
    """The shipped Hi-DiT encode config, run in process on the digits."""
    return load_config(EncodeJobConfig, REPO / "configs/encode/hidit-classfolder-taef2-pixels.yaml", [
        f"source.root={root}", f"output.uri={out}", f"output.store_pixels={str(store_pixels).lower()}",
        "text.tiny=true"])


@pytest.fixture(scope="module")
def caches(digit_classes, tmp_path_factory) -> dict[bool, Path]:
    out = tmp_path_factory.mktemp("caches")
    for store in (False, True):
        run_local(hidit_job(digit_classes, out / str(store), store))
    return {store: out / str(store) for store in (False, True)}


def samples_of(cache: Path) -> dict[str, object]:
    return {sample.key: sample for sample in read_samples(shard_uris(str(cache)), SkipCounter(fail_fast=True))}


def test_stored_pixels_are_the_preprocessed_images_the_latents_were_encoded_from(caches, digit_classes):
    samples = samples_of(caches[True])
    assert len(samples) == DIGITS and read_manifest(str(caches[True])).pixels
    job = hidit_job(digit_classes, caches[True], True)
    for key, sample in list(samples.items())[:10]:
        label, name = key.split("__")
        expected = prepare_image((digit_classes / label / f"{name}.png").read_bytes(), job.preprocess).pixels
        assert sample.pixels.dtype == np.uint8 and sample.pixels.shape == (64, 64, 3)
        np.testing.assert_array_equal(sample.pixels, expected)
        assert sample.latent.shape == (32, 8, 8)
        assert sample.caption == f"a handwritten digit {label}"


def test_without_the_option_the_cache_has_no_pixels_and_the_same_latents(caches):
    plain, with_pixels = samples_of(caches[False]), samples_of(caches[True])
    assert not read_manifest(str(caches[False])).pixels
    assert all(sample.pixels is None for sample in plain.values())
    for key, sample in plain.items():
        np.testing.assert_array_equal(sample.latent, with_pixels[key].latent)


def test_pixels_cost_their_raw_bytes_per_sample(caches):
    per_sample = {}
    for store, cache in caches.items():
        card = read_manifest(str(cache))
        per_sample[store] = card.num_bytes / card.num_samples
    extra = per_sample[True] - per_sample[False]
    print(f"\nbytes/sample on 64 px digits (taef2 fp16 latent + MiniLM fp16 text): without pixels "
          f"{per_sample[False]:.0f}, with {per_sample[True]:.0f} (+{extra:.0f}, x{per_sample[True] / per_sample[False]:.2f})")
    raw = 64 * 64 * 3
    # the uint8 array, its .npy header and its tar member header (+ padding to 512-byte blocks)
    assert raw <= extra <= raw + 128 + 1024
