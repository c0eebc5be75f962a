"""Streams `CacheSample`s from cache shards with WebDataset, and batches them for the train job."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
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


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The epoch's shard order: a permutation seeded by (seed, epoch), or the listed order."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


class _ShardList(torch.utils.data.IterableDataset):
    """The shards this rank and DataLoader worker read this epoch, as `(shard index, uri)`."""

    def __init__(self, uris: Sequence[str], order: list[int], split_by_node: bool) -> None:
        super().__init__()
        self.uris = list(uris)
        self.order = order
        self.split_by_node = split_by_node

    def __iter__(self) -> Iterator[tuple[int, str]]:
        rank, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        order = self.order[rank::world_size] if self.split_by_node else self.order
        for shard_index in order[worker::num_workers]:
            yield shard_index, self.uris[shard_index]


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


def _read_shards(shards: Iterator[tuple[int, str]], handler: SkipCounter) -> Iterator[CacheSample]:
    """Every decodable sample of each shard, tagged with (shard index, sample index in the shard)."""
    for shard_index, uri in shards:
        for sample_index, raw in read_shard(uri, handler):
            try:
                sample = decode_sample(raw)
            except CacheFormatError as error:
                handler("corrupt_sample", f"sample {sample_index} of {uri}", error)
                continue
            sample.position = (shard_index, sample_index)
            yield sample


def cache_dataset(
    shard_uris: Sequence[str],
    *,
    shuffle_buffer: int,
    seed: int,
    split_by_node: bool,
    handler: SkipCounter | None = None,
    epoch: int = 0,
    skip_shards: Collection[int] = (),
) -> wds.DataPipeline:
    """One epoch of `CacheSample`s over `shard_uris` (local paths, file:// or s3:// via services.storage).

    Shards are read in `shard_order(seed, epoch)`, split over ranks when `split_by_node` (ranks from
    torch.distributed or RANK/WORLD_SIZE) and over DataLoader workers, then samples pass through a
    seeded shuffle buffer. `shuffle_buffer=0` reads shards and samples in listed order. Each sample
    carries `position = (shard index, sample index)` so the train job can record where it is and
    resume by passing the finished shard indices as `skip_shards`. Build one pipeline per epoch.
    """
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if not shard_uris:
        raise ValueError("cache_dataset needs at least one shard URI (is the bucket empty?)")
    handler = handler or SkipCounter()
    skipped = set(skip_shards)
    order = [
        i
        for i in shard_order(len(shard_uris), seed=seed, epoch=epoch, shuffle=shuffle_buffer > 0)
        if i not in skipped
    ]
    stages: list[Any] = [
        _ShardList(shard_uris, order, split_by_node),
        partial(_read_shards, handler=handler),  # a partial, not a lambda: spawn workers pickle the pipeline
    ]
    if shuffle_buffer > 0:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, seed=seed * 1_000_003 + epoch))
    return wds.DataPipeline(*stages)


def collate(samples: Sequence[CacheSample], *, pad_to_multiple: int = 1) -> dict[str, Any]:
    """A batch of one bucket: latents (B, C, h, w), text zero-padded to (B, Lmax, D) with its bool mask."""
    if not samples:
        raise ValueError("collate got an empty batch")
    shapes = {sample.latent.shape for sample in samples}
    if len(shapes) > 1:
        raise ValueError(f"batch mixes latent shapes {sorted(shapes)}: batch each bucket separately")
    dims = {sample.text.shape[1] for sample in samples}
    if len(dims) > 1:
        raise ValueError(f"batch mixes text dims {sorted(dims)}: samples come from different text encoders")
    lengths = [sample.text.shape[0] for sample in samples]
    max_len = -(-max(lengths) // pad_to_multiple) * pad_to_multiple
    # Filled in numpy, then shared with torch: several times faster than per-row tensor copies on CPU.
    text = np.zeros((len(samples), max_len, dims.pop()), dtype=np.float32)
    text_mask = np.zeros((len(samples), max_len), dtype=bool)
    for row, sample in enumerate(samples):
        text[row, : len(sample.text)] = sample.text
        text_mask[row, : len(sample.text)] = True
    return {
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


def load_null_text(out_uri: str) -> np.ndarray:
    """The text encoder's (L, D) float32 output for the empty prompt, used for CFG dropout."""
    uri = layout.null_text_uri(out_uri)
    try:
        return npy_view(storage.read_bytes(uri), uri).astype(np.float32)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{uri} does not exist: the encode job writes it before any shard") from error
