"""The cache's dataset card (`manifest.json`), per-unit progress records and the encode job's plan."""

from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from pydantic import Field

from services import storage
from services.cache import layout
from services.cache.schema import LatentDtype, TextDtype
from services.config import StrictModel

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class ShardInfo(StrictModel):
    """One uploaded shard: its path relative to the cache root, bucket, size and checksum."""

    path: str  # "shards/<bucket>/<unit>-NNNN.tar"; join with the cache URI to read it
    bucket: str
    num_samples: int = Field(ge=0)
    num_bytes: int = Field(ge=0)
    sha256: str


class UnitProgress(StrictModel):
    """What one input unit produced; written once its shards are uploaded (drives resume and status)."""

    unit: str
    input_uri: str
    shards: list[ShardInfo]
    samples_written: int = Field(ge=0)
    failures: dict[str, int] = Field(default_factory=dict)  # reason -> dropped samples
    seconds: float = Field(ge=0)
    finished_at: datetime = Field(default_factory=utc_now)


class EncodePlan(StrictModel):
    """Every unit the encode job was started on, so status can show done/total."""

    units: list[str]
    created_at: datetime = Field(default_factory=utc_now)


class CacheManifest(StrictModel):
    """Dataset card of a latent cache: encoders, storage dtypes, counts and the shard list."""

    format_version: int = FORMAT_VERSION
    codec: dict[str, Any]  # the codec registry's describe()
    latent_channels: int = Field(gt=0)
    latent_scale: float | list[float]  # latents were stored as (z - shift) * scale
    latent_shift: float | list[float] = 0.0
    latent_dtype: LatentDtype
    text_encoder: dict[str, Any]  # the text encoder registry's describe()
    text_dim: int = Field(gt=0)
    text_max_len: int = Field(gt=0)
    text_dtype: TextDtype
    pixels: bool = Field(False, description="samples carry pixels.npy, the preprocessed image (output.store_pixels)")
    num_units: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    num_bytes: int = Field(ge=0)
    shards: list[ShardInfo]
    bucket_counts: dict[str, int]  # "{h}x{w}" -> samples
    failures: dict[str, int]  # reason -> dropped samples, over all units
    job_config: dict[str, Any] = Field(default_factory=dict)  # the encode job's effective config
    created_at: datetime
    updated_at: datetime

    def bucket_shape(self, bucket: str) -> tuple[int, int, int]:
        """(C, h, w) of the latents in `bucket`."""
        if bucket not in self.bucket_counts:
            raise KeyError(f"bucket {bucket!r} is not in this cache (buckets: {sorted(self.bucket_counts)})")
        return self.latent_channels, *layout.bucket_size(bucket)


def write_progress(out_uri: str, progress: UnitProgress) -> None:
    storage.write_json(layout.progress_uri(out_uri, progress.unit), progress.model_dump(mode="json"))


def read_progress(out_uri: str, unit: str) -> UnitProgress | None:
    """The unit's progress record, or None when the unit has not finished (so it must be (re)run)."""
    uri = layout.progress_uri(out_uri, unit)
    if not storage.exists(uri):
        return None
    return UnitProgress.model_validate(storage.read_json(uri))


class ProgressRecords:
    """The cache's progress records, each fetched once: a later `read()` lists the folder again and fetches only
    the records added or rewritten since (by the object version the listing gives, e.g. S3's ETag).

    The encode job reads them when it plans and again, more than once, when it publishes the manifest;
    with one of these for the whole run, that costs a listing per read plus one GET per record in all,
    not one GET per record per read.
    """

    def __init__(self, out_uri: str) -> None:
        self.out_uri = out_uri
        self._known: dict[str, tuple[str | None, UnitProgress]] = {}  # record URI -> (its version when read, the record)

    def read(self) -> list[UnitProgress]:
        """Every finished unit's progress record, sorted by unit name."""
        versions = {uri: version for uri, version in storage.list_versions(layout.progress_dir_uri(self.out_uri)).items()
                    if uri.endswith(".json")}
        stale = [uri for uri, version in versions.items() if version is None or uri not in self._known
                 or self._known[uri][0] != version]
        # One small GET per record: on S3 with ~1,600 units, reading them side by side matters.
        with ThreadPoolExecutor(max_workers=16) as pool:
            fetched = list(pool.map(lambda uri: UnitProgress.model_validate(storage.read_json(uri)), stale))
        self._known = {uri: self._known[uri] for uri in versions if uri in self._known}  # deleted records go
        self._known.update({uri: (versions[uri], record) for uri, record in zip(stale, fetched, strict=True)})
        return sorted((record for _, record in self._known.values()), key=lambda record: record.unit)


def list_progress(out_uri: str) -> list[UnitProgress]:
    """Every finished unit's progress record, sorted by unit name."""
    return ProgressRecords(out_uri).read()


def write_plan(out_uri: str, units: list[str]) -> None:
    storage.write_json(layout.plan_uri(out_uri), EncodePlan(units=list(units)).model_dump(mode="json"))


def read_plan(out_uri: str) -> EncodePlan | None:
    uri = layout.plan_uri(out_uri)
    return EncodePlan.model_validate(storage.read_json(uri)) if storage.exists(uri) else None


def build_manifest(
    out_uri: str,
    *,
    codec: dict[str, Any],
    latent_channels: int,
    latent_scale: float | list[float],
    latent_shift: float | list[float],
    latent_dtype: LatentDtype,
    text_encoder: dict[str, Any],
    text_dim: int,
    text_max_len: int,
    text_dtype: TextDtype,
    job_config: dict[str, Any],
    progresses: list[UnitProgress],
    pixels: bool = False,
) -> CacheManifest:
    """Aggregate the units' progress into the manifest, keeping `created_at` of an existing one."""
    existing = read_manifest(out_uri) if storage.exists(layout.manifest_uri(out_uri)) else None
    now = utc_now()
    shards = [shard for progress in sorted(progresses, key=lambda p: p.unit) for shard in progress.shards]
    bucket_counts: Counter[str] = Counter()
    for shard in shards:
        bucket_counts[shard.bucket] += shard.num_samples
    failures: Counter[str] = Counter()
    for progress in progresses:
        failures.update(progress.failures)
    return CacheManifest(
        codec=codec,
        latent_channels=latent_channels,
        latent_scale=latent_scale,
        latent_shift=latent_shift,
        latent_dtype=latent_dtype,
        text_encoder=text_encoder,
        text_dim=text_dim,
        text_max_len=text_max_len,
        text_dtype=text_dtype,
        pixels=pixels,
        num_units=len(progresses),
        num_samples=sum(shard.num_samples for shard in shards),
        num_bytes=sum(shard.num_bytes for shard in shards),
        shards=shards,
        bucket_counts=dict(sorted(bucket_counts.items())),
        failures=dict(sorted(failures.items())),
        job_config=job_config,
        created_at=existing.created_at if existing else now,
        updated_at=now,
    )


def write_manifest(out_uri: str, manifest: CacheManifest) -> None:
    storage.write_json(layout.manifest_uri(out_uri), manifest.model_dump(mode="json"))
    logger.info(
        "wrote manifest of %d samples in %d shards to %s", manifest.num_samples, len(manifest.shards), out_uri
    )


def read_manifest(out_uri: str) -> CacheManifest:
    uri = layout.manifest_uri(out_uri)
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"{uri} does not exist: {out_uri} is not a finished latent cache (run the encode job)"
        )
    manifest = CacheManifest.model_validate(storage.read_json(uri))
    if manifest.format_version != FORMAT_VERSION:
        raise ValueError(
            f"{uri} has cache format {manifest.format_version}; this code reads format {FORMAT_VERSION}"
        )
    return manifest


def shard_uris(out_uri: str, *, bucket: str | None = None) -> list[str]:
    """Shard URIs listed in the manifest (never a storage listing: stale shards are not read)."""
    manifest = read_manifest(out_uri)
    if bucket is not None and bucket not in manifest.bucket_counts:
        raise KeyError(f"bucket {bucket!r} is not in {out_uri} (buckets: {sorted(manifest.bucket_counts)})")
    return [
        storage.join(out_uri, shard.path)
        for shard in manifest.shards
        if bucket is None or shard.bucket == bucket
    ]
