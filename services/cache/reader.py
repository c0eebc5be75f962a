"""Reads cache shards (whole, checked against the manifest), decodes their samples, and pads them into batches."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from webdataset.tariterators import group_by_keys

from services import storage
from services.cache import layout
from services.cache.schema import CacheFormatError, CacheSample, decode_sample, npy_view
from services.cache.tar_members import TarMembers

logger = logging.getLogger(__name__)


class CorruptCacheError(RuntimeError):
    """A shard or sample could not be read and the reader was told to fail fast."""


class SkipCounter:
    """What to do with an unreadable shard or sample: count it by reason and log it, or raise."""

    def __init__(self, *, fail_fast: bool = False) -> None:
        self.fail_fast = fail_fast
        # Counts live in the process that iterates: a DataLoader worker keeps its own.
        self.counts: Counter[str] = Counter()

    def __call__(self, reason: str, where: str, error: Exception) -> None:
        if self.fail_fast:
            raise CorruptCacheError(f"{where}: {reason}: {error}") from error
        self.counts[reason] += 1
        logger.warning("skipped %s (%s): %s", where, reason, error)


def checksum_problem(data: bytes | memoryview, num_bytes: int, sha256: str) -> str | None:
    """What differs between fetched shard bytes and the size and sha256 the manifest recorded, or None."""
    if len(data) != num_bytes:
        return f"{len(data)} bytes, the manifest records {num_bytes}"
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        return f"sha256 {digest}, the manifest records {sha256}"
    return None


def read_shard(uri: str, handler: SkipCounter, *, num_bytes: int | None = None,
               sha256: str | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(sample index, files of the sample) for each sample of one shard, undecoded.

    The shard is fetched whole with one request (shards are at most `max_shard_bytes`, 128 MiB by
    default) and the files are views into that buffer. A missing, garbled or cut shard is reported
    to `handler` by reason; the samples before a garbled or cut point are still yielded. Given the
    manifest's `num_bytes` and `sha256`, a shard whose bytes differ yields nothing and is reported
    as `checksum_mismatch`: none of its samples can be trusted. Any other storage failure raises: a
    server that is down is waited out by `storage` up to its retry deadline and then fails the
    reader, because it says nothing about the data.
    """
    try:
        shard_bytes = storage.read_bytes(uri)
    except storage.StorageNotFoundError as error:
        handler("missing_shard", uri, error)
        return
    if sha256 is not None and num_bytes is not None:
        problem = checksum_problem(shard_bytes, num_bytes, sha256)
        if problem is not None:
            handler("checksum_mismatch", uri, ValueError(f"shard bytes differ from the manifest: {problem}"))
            return
    try:
        archive = TarMembers(memoryview(shard_bytes))
        members = ({"fname": name, "data": data, "__url__": uri} for name, data in archive)
        yield from enumerate(group_by_keys(members))
        if not archive.complete:
            handler("truncated_shard", uri, EOFError(f"no end-of-archive marker in {len(archive.data)} bytes"))
    except CorruptCacheError:
        raise
    except Exception as error:  # a garbled tar: the rest of the shard is lost
        handler("unreadable_shard", uri, error)


def read_samples(shard_uris: Sequence[str], handler: SkipCounter | None = None) -> Iterator[CacheSample]:
    """Every decodable sample of each shard, in listed order, tagged with (shard index, sample index in the shard).

    For reading a cache front to back (indexing bare shards, the evaluation's reference images); the
    train job reads through its epoch plan (`trainer.data`), with the same `read_shard` and `decode_sample`.
    """
    handler = handler or SkipCounter()
    for shard_index, uri in enumerate(shard_uris):
        for sample_index, raw in read_shard(uri, handler):
            try:
                sample = decode_sample(raw)
            except CacheFormatError as error:
                handler("corrupt_sample", f"sample {sample_index} of {uri}", error)
                continue
            sample.position = (shard_index, sample_index)
            yield sample


def pad_text(texts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Real-token texts [(L_i, D)] -> zero-padded (B, Lmax, D) float32 and its mask (B, Lmax), True = real token.

    When every text is empty one masked slot is kept, so that the shapes stay valid for attention.
    """
    dims = {text.shape[1] for text in texts}
    if len(dims) > 1:
        raise ValueError(f"batch mixes text dims {sorted(dims)}: samples come from different text encoders")
    max_len = max(1, *(len(text) for text in texts))
    # Filled in numpy, then shared with torch: several times faster than per-row tensor copies on CPU.
    padded = np.zeros((len(texts), max_len, dims.pop()), dtype=np.float32)
    mask = np.zeros((len(texts), max_len), dtype=bool)
    for row, text in enumerate(texts):
        padded[row, : len(text)] = text
        mask[row, : len(text)] = True
    return padded, mask


def collate(samples: Sequence[CacheSample]) -> dict[str, Any]:
    """A batch of one bucket: latents (B, C, h, w), text zero-padded to (B, Lmax, D) with its bool mask."""
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = {sample.latent.shape for sample in samples}
    if len(shapes) > 1:
        raise ValueError(f"batch mixes latent shapes {sorted(shapes)}: batch each bucket separately")
    text, text_mask = pad_text([sample.text for sample in samples])
    batch: dict[str, Any] = {
        "latent": torch.from_numpy(
            np.stack([sample.latent for sample in samples]).astype(np.float32, copy=False)
        ),
        "text": torch.from_numpy(text),
        "text_mask": torch.from_numpy(text_mask),
        "keys": [sample.key for sample in samples],
        "captions": [sample.caption for sample in samples],
        "meta": [sample.meta for sample in samples],
        "positions": [sample.position for sample in samples],
    }
    with_pixels = [sample.pixels for sample in samples if sample.pixels is not None]
    if with_pixels:
        # (B, H, W, 3) uint8; a sample without pixels (a zero-weight placeholder) gets a black image
        shapes = {pixels.shape for pixels in with_pixels}
        if len(shapes) > 1:
            raise ValueError(f"batch mixes pixel shapes {sorted(shapes)}: batch each bucket separately")
        blank = np.zeros_like(with_pixels[0])
        batch["pixels"] = torch.from_numpy(np.stack([blank if s.pixels is None else s.pixels for s in samples]))
    return batch


def load_null_text(uri: str) -> np.ndarray:
    """The text encoder's (L, D) float32 output for the empty prompt, used for CFG dropout, from its .npy at `uri`."""
    try:
        return npy_view(storage.read_bytes(uri), uri).astype(np.float32)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri} does not exist: the encode job writes {layout.NULL_TEXT} into a cache "
                                "before any shard; give data.null_text_uri, or cfg_dropout=0") from error
