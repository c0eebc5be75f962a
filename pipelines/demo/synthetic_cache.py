"""A learnable synthetic latent cache (each class a fixed latent pattern plus noise, its text naming the class),
written with the encode job's own cache writer: for benchmarks and tests that need a cache without encoders."""

from __future__ import annotations

import numpy as np

from services.cache import manifest
from services.cache.schema import CacheSample
from services.cache.writer import UnitShardWriter, write_null_text

TEXT_DIM = 32  # the tiny model presets' text_dim
CHANNELS = 4
NUM_CLASSES = 4


def class_sample(key: str, label: int, rng: np.random.Generator, side: int = 8, channels: int = CHANNELS
                 ) -> CacheSample:
    """A learnable conditional pair: the latent is the label's fixed pattern plus noise, the text names the label."""
    patterns = np.random.default_rng(1234).standard_normal((NUM_CLASSES, channels, side, side)).astype(np.float32)
    texts = np.random.default_rng(4321).standard_normal((NUM_CLASSES, 3, TEXT_DIM)).astype(np.float32)
    latent = patterns[label] + 0.1 * rng.standard_normal((channels, side, side)).astype(np.float32)
    return CacheSample(key=key, latent=latent, text=texts[label][: 1 + label % 3], caption=f"class {label}",
                       meta={"label": label})


def with_pixels(sample: CacheSample, factor: int) -> CacheSample:
    """The sample with an image `factor` x its latent's side: its first three channels, upsampled, as uint8."""
    rgb = np.repeat(np.repeat(sample.latent[:3], factor, axis=1), factor, axis=2).transpose(1, 2, 0)
    sample.pixels = np.clip(127.5 + 60 * rgb, 0, 255).astype(np.uint8)
    return sample


def write_tiny_cache(out_uri: str, *, shard_sizes: list[int], sides: list[int] | None = None, seed: int = 0,
                     channels: int = CHANNELS, codec: dict | None = None, text_encoder: dict | None = None,
                     pixel_factor: int | None = None) -> list[str]:
    """One unit per shard, `shard_sizes[i]` samples in shard i (latent side `sides[i]`); returns every key.

    With `pixel_factor` every sample also carries pixels (as `output.store_pixels` writes them) and the manifest
    says so.
    """
    rng = np.random.default_rng(seed)
    sides = sides or [8] * len(shard_sizes)
    progresses, keys = [], []
    write_null_text(out_uri, np.zeros((1, TEXT_DIM), np.float32))
    for unit_index, (size, side) in enumerate(zip(shard_sizes, sides, strict=True)):
        unit = f"unit{unit_index:03d}"
        with UnitShardWriter(out_uri, unit, latent_dtype="fp16", text_dtype="fp16",
                             max_samples_per_shard=max(size, 1)) as writer:
            for i in range(size):
                key = f"{unit}_{i:04d}"
                sample = class_sample(key, int(rng.integers(NUM_CLASSES)), rng, side, channels)
                writer.write(with_pixels(sample, pixel_factor) if pixel_factor else sample)
                keys.append(key)
        progresses.append(manifest.UnitProgress(unit=unit, input_uri=f"memory://{unit}", shards=writer.close(),
                                                samples_written=size, seconds=0.0))
    card = manifest.build_manifest(
        out_uri, codec=codec or {"name": "pixel"}, latent_channels=channels, latent_scale=1.0, latent_shift=0.0,
        latent_dtype="fp16", text_encoder=text_encoder or {"name": "tiny-test"}, text_dim=TEXT_DIM,
        text_max_len=16, text_dtype="fp16", job_config={}, progresses=progresses, pixels=pixel_factor is not None,
    )
    manifest.write_manifest(out_uri, card)
    return keys
