from __future__ import annotations

from datetime import datetime, timezone

import pytest

from services.cache.manifest import (
    CacheManifest,
    ShardInfo,
    UnitProgress,
    build_manifest,
    list_progress,
    read_manifest,
    read_plan,
    read_progress,
    shard_uris,
    write_manifest,
    write_plan,
    write_progress,
)

ENCODERS = dict(
    codec={"name": "pixel", "patch": 2},
    latent_channels=12,
    latent_scale=1.0,
    latent_shift=0.0,
    latent_dtype="fp16",
    text_encoder={"name": "minilm", "dim": 384},
    text_dim=384,
    text_max_len=256,
    text_dtype="int8",
    job_config={"source": {"kind": "folder"}},
)


def progress(
    unit: str, shards: list[tuple[str, int]], failures: dict[str, int] | None = None
) -> UnitProgress:
    infos = [
        ShardInfo(
            path=f"shards/{bucket}/{unit}-{i:04d}.tar",
            bucket=bucket,
            num_samples=n,
            num_bytes=1000 * n,
            sha256="0" * 64,
        )
        for i, (bucket, n) in enumerate(shards)
    ]
    return UnitProgress(
        unit=unit,
        input_uri=f"s3://in/{unit}.tar",
        shards=infos,
        samples_written=sum(n for _, n in shards),
        failures=failures or {},
        seconds=10.0,
        finished_at=datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc),
    )


def test_progress_round_trips_and_a_missing_unit_reads_as_none(tmp_path):
    out = str(tmp_path)
    record = progress("a/b.tar", [("16x16", 3)], {"decode_error": 2})
    write_progress(out, record)
    assert read_progress(out, "a/b.tar") == record
    assert read_progress(out, "never-ran") is None


def test_list_progress_returns_every_unit_sorted_and_nothing_for_a_new_cache(tmp_path):
    out = str(tmp_path)
    assert list_progress(out) == []
    for unit in ("u2", "u1"):
        write_progress(out, progress(unit, [("16x16", 1)]))
    assert [record.unit for record in list_progress(out)] == ["u1", "u2"]


def test_plan_round_trips_and_is_none_before_the_job_starts(tmp_path):
    assert read_plan(str(tmp_path)) is None
    write_plan(str(tmp_path), ["u1", "u2", "u3"])
    assert read_plan(str(tmp_path)).units == ["u1", "u2", "u3"]


def test_manifest_aggregates_counts_buckets_and_failures_from_progress(tmp_path):
    records = [
        progress("u1", [("16x16", 4), ("16x24", 2)], {"decode_error": 1}),
        progress("u2", [("16x16", 3)], {"decode_error": 2, "too_small": 5}),
    ]
    manifest = build_manifest(str(tmp_path), progresses=records, **ENCODERS)
    assert (manifest.num_units, manifest.num_samples, manifest.num_bytes) == (2, 9, 9000)
    assert manifest.bucket_counts == {"16x16": 7, "16x24": 2}
    assert manifest.failures == {"decode_error": 3, "too_small": 5}
    assert manifest.bucket_shape("16x24") == (12, 16, 24)


def test_manifest_round_trips_and_a_rebuild_keeps_its_creation_time(tmp_path):
    out = str(tmp_path)
    first = build_manifest(out, progresses=[progress("u1", [("16x16", 1)])], **ENCODERS)
    write_manifest(out, first)
    assert read_manifest(out) == first
    rebuilt = build_manifest(
        out, progresses=[progress("u1", [("16x16", 1)]), progress("u2", [("16x16", 1)])], **ENCODERS
    )
    assert rebuilt.created_at == first.created_at and rebuilt.updated_at >= first.updated_at


def test_shard_uris_come_from_the_manifest_not_from_a_listing(tmp_path):
    out = str(tmp_path)
    (tmp_path / "shards" / "16x16").mkdir(parents=True)
    (tmp_path / "shards" / "16x16" / "stale-0009.tar").write_bytes(b"left over from an older run")
    write_manifest(
        out, build_manifest(out, progresses=[progress("u1", [("16x16", 1), ("8x8", 1)])], **ENCODERS)
    )
    assert shard_uris(out) == [f"{out}/shards/16x16/u1-0000.tar", f"{out}/shards/8x8/u1-0001.tar"]
    assert shard_uris(out, bucket="8x8") == [f"{out}/shards/8x8/u1-0001.tar"]
    with pytest.raises(KeyError, match="'4x4' is not in"):
        shard_uris(out, bucket="4x4")


def test_read_manifest_of_an_unfinished_cache_names_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json does not exist"):
        read_manifest(str(tmp_path))


def test_manifest_rejects_an_unknown_text_dtype():
    with pytest.raises(ValueError, match="text_dtype"):
        CacheManifest(
            **{**ENCODERS, "text_dtype": "int4"},
            num_units=0,
            num_samples=0,
            num_bytes=0,
            shards=[],
            bucket_counts={},
            failures={},
            created_at=datetime.now(timezone.utc),
            updated_at=datetime.now(timezone.utc),
        )
