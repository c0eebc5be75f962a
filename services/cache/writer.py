"""Writes one input unit's samples into per-bucket WebDataset shards, each uploaded in one atomic put."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, field

import numpy as np
from webdataset import TarWriter

from services import storage
from services.cache import layout
from services.cache.manifest import ShardInfo
from services.cache.schema import CacheSample, LatentDtype, TextDtype, encode_sample, npy_bytes

logger = logging.getLogger(__name__)

DEFAULT_MAX_SAMPLES_PER_SHARD = 1000
DEFAULT_MAX_SHARD_BYTES = 128 * 1024 * 1024


@dataclass
class _OpenShard:
    """A shard being filled in memory; nothing is visible in storage until it is uploaded whole."""

    path: str
    bucket: str
    buffer: io.BytesIO = field(default_factory=io.BytesIO)
    tar: TarWriter | None = None
    num_samples: int = 0
    payload_bytes: int = 0  # file contents so far; the tar stream buffers, so its tell() lags behind

    def __post_init__(self) -> None:
        # A fixed mtime makes a re-run of the same unit produce byte-identical shards.
        self.tar = TarWriter(self.buffer, encoder=False, mtime=0)


class UnitShardWriter:
    """Shards of one input unit: `shards/<bucket>/<unit>-NNNN.tar`, numbered per bucket from 0000."""

    def __init__(
        self,
        out_uri: str,
        unit: str,
        *,
        latent_dtype: LatentDtype,
        text_dtype: TextDtype,
        max_samples_per_shard: int = DEFAULT_MAX_SAMPLES_PER_SHARD,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> None:
        if max_samples_per_shard < 1 or max_shard_bytes < 1:
            raise ValueError(
                f"max_samples_per_shard ({max_samples_per_shard}) and max_shard_bytes ({max_shard_bytes})"
                " must both be >= 1"
            )
        self.out_uri = out_uri
        self.unit = unit
        self.latent_dtype: LatentDtype = latent_dtype
        self.text_dtype: TextDtype = text_dtype
        self.max_samples_per_shard = max_samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.samples_written = 0
        self._open: dict[str, _OpenShard] = {}
        self._next_index: dict[str, int] = {}
        self._uploaded: list[ShardInfo] = []
        self._closed = False

    def write(self, sample: CacheSample) -> None:
        """Append a sample to the open shard of its bucket, uploading that shard once it is full."""
        if self._closed:
            raise RuntimeError(f"writer of unit {self.unit!r} is closed")
        files = encode_sample(sample, latent_dtype=self.latent_dtype, text_dtype=self.text_dtype)
        bucket = layout.bucket_name(*sample.latent.shape[1:])
        shard = self._open.get(bucket) or self._start_shard(bucket)
        shard.payload_bytes += shard.tar.write(files)
        shard.num_samples += 1
        self.samples_written += 1
        if shard.num_samples >= self.max_samples_per_shard or shard.payload_bytes >= self.max_shard_bytes:
            self._upload(self._open.pop(bucket))

    def close(self) -> list[ShardInfo]:
        """Upload the partly filled shards; returns every shard of the unit, sorted by path."""
        if not self._closed:
            for bucket in sorted(self._open):
                self._upload(self._open.pop(bucket))
            self._closed = True
        return sorted(self._uploaded, key=lambda shard: shard.path)

    def abort(self) -> None:
        """Drop the shards still in memory (the unit has no progress record, so it will be re-run)."""
        self._open.clear()
        self._closed = True

    def __enter__(self) -> UnitShardWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _start_shard(self, bucket: str) -> _OpenShard:
        index = self._next_index.get(bucket, 0)
        self._next_index[bucket] = index + 1
        shard = _OpenShard(path=layout.shard_path(bucket, self.unit, index), bucket=bucket)
        self._open[bucket] = shard
        return shard

    def _upload(self, shard: _OpenShard) -> None:
        shard.tar.close()
        data = shard.buffer.getvalue()
        storage.write_bytes(storage.join(self.out_uri, shard.path), data)
        info = ShardInfo(
            path=shard.path,
            bucket=shard.bucket,
            num_samples=shard.num_samples,
            num_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        )
        self._uploaded.append(info)
        logger.debug("uploaded %s (%d samples, %d bytes)", shard.path, info.num_samples, info.num_bytes)


def write_null_text(out_uri: str, null_text: np.ndarray) -> None:
    """Store the text encoder's (L, D) output for the empty prompt, in float32, for CFG dropout."""
    if null_text.ndim != 2:
        raise ValueError(f"null text must be (L, D) real tokens, got shape {null_text.shape}")
    storage.write_bytes(layout.null_text_uri(out_uri), npy_bytes(np.asarray(null_text, dtype=np.float32)))
