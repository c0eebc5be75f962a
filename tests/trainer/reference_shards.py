"""Shards in the reference project's layout for the trainer tests (the cache itself: pipelines.demo.synthetic_cache)."""

from __future__ import annotations

import io

import numpy as np
from webdataset import TarWriter

from pipelines.demo.synthetic_cache import NUM_CLASSES, TEXT_DIM, class_sample
from services import storage
from services.cache.schema import npy_bytes


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
