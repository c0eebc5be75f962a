"""Tiny latent caches for the trainer tests, written with the cache writer the encode job uses."""

from __future__ import annotations

import io

import numpy as np
from webdataset import TarWriter

from services import storage
from services.cache import manifest
from services.cache.schema import CacheSample, npy_bytes
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


def write_tiny_cache(out_uri: str, *, shard_sizes: list[int], sides: list[int] | None = None, seed: int = 0,
                     channels: int = CHANNELS, codec: dict | None = None, text_encoder: dict | None = None
                     ) -> list[str]:
    """One unit per shard, `shard_sizes[i]` samples in shard i (latent side `sides[i]`); returns every key."""
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
                writer.write(class_sample(key, int(rng.integers(NUM_CLASSES)), rng, side, channels))
                keys.append(key)
        progresses.append(manifest.UnitProgress(unit=unit, input_uri=f"memory://{unit}", shards=writer.close(),
                                                samples_written=size, seconds=0.0))
    card = manifest.build_manifest(
        out_uri, codec=codec or {"name": "pixel"}, latent_channels=channels, latent_scale=1.0, latent_shift=0.0,
        latent_dtype="fp16", text_encoder=text_encoder or {"name": "tiny-test"}, text_dim=TEXT_DIM,
        text_max_len=16, text_dtype="fp16", job_config={}, progresses=progresses,
    )
    manifest.write_manifest(out_uri, card)
    return keys


def write_reference_shard(uri: str, keys: list[str], *, seed: int = 0, padded_len: int = 8) -> None:
    """A shard in the reference project's layout: `latents.npy` (1, C, h, w), text padded + `text_mask.npy`."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False, mtime=0) as tar:
        for key in keys:
            sample = class_sample(key, int(rng.integers(NUM_CLASSES)), rng)
            text = np.zeros((padded_len, TEXT_DIM), np.float16)
            text[: len(sample.text)] = sample.text
            mask = np.arange(padded_len) < len(sample.text)
            tar.write({"__key__": key, "latents.npy": npy_bytes(sample.latent[None].astype(np.float16)),
                       "text.npy": npy_bytes(text), "text_mask.npy": npy_bytes(mask),
                       "caption.txt": sample.caption.encode(), "meta.json": b"{}"})
    storage.write_bytes(uri, buffer.getvalue())
