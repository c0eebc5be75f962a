"""The cache on a real S3 server (SeaweedFS on loopback): write, manifest, stream back, status."""

from __future__ import annotations

import json

import numpy as np
import pytest

from services import storage
from services.cache import layout
from services.cache.manifest import (
    ProgressRecords,
    UnitProgress,
    build_manifest,
    list_progress,
    shard_uris,
    write_manifest,
    write_progress,
)
from services.cache.reader import SkipCounter, load_null_text, read_samples
from services.cache.schema import CacheSample
from services.cache.writer import UnitShardWriter, write_null_text
from services.cli import main

UNIT = "fine-t2i/train-000007.tar"


def test_cache_written_to_s3_streams_back_every_sample_and_reports_status(s3_server, capsys):
    out = s3_server.uri("cache-roundtrip")
    rng = np.random.default_rng(0)
    writer = UnitShardWriter(out, UNIT, latent_dtype="bf16", text_dtype="int8", max_samples_per_shard=3)
    for i in range(7):
        text = rng.standard_normal((5 + i, 32)).astype(np.float32)
        writer.write(CacheSample(f"id{i}", rng.standard_normal((4, 8, 8)).astype(np.float32), text, "c", {}))
    progress = UnitProgress(
        unit=UNIT, input_uri="hf://x", shards=writer.close(), samples_written=7, seconds=1.0
    )
    write_progress(out, progress)
    write_null_text(out, np.zeros((1, 32), np.float32))
    manifest = build_manifest(
        out,
        codec={"name": "pixel"},
        latent_channels=4,
        latent_scale=1.0,
        latent_shift=0.0,
        latent_dtype="bf16",
        text_encoder={"name": "tiny"},
        text_dim=32,
        text_max_len=64,
        text_dtype="int8",
        job_config={},
        progresses=list_progress(out),
    )
    write_manifest(out, manifest)

    uris = shard_uris(out, bucket="8x8")
    assert len(uris) == 3 and all(uri.startswith("s3://") for uri in uris)
    samples = list(read_samples(uris, SkipCounter(fail_fast=True)))
    assert sorted(s.key for s in samples) == [f"id{i}" for i in range(7)]
    assert load_null_text(layout.null_text_uri(out)).shape == (1, 32)
    assert main(["status", out, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 7


@pytest.mark.parametrize("where", ["local", "s3"])
def test_progress_records_read_again_fetch_only_the_records_added_or_rewritten_since(where, s3_server, tmp_path,
                                                                                     monkeypatch):
    out = str(tmp_path / "cache") if where == "local" else s3_server.uri("progress-records")
    fetched: list[str] = []
    real_read_json = storage.read_json

    def counting_read_json(uri, config=None):
        fetched.append(uri.rsplit("/", 1)[-1])
        return real_read_json(uri, config)

    monkeypatch.setattr(storage, "read_json", counting_read_json)

    def record(unit: str, samples: int) -> UnitProgress:
        return UnitProgress(unit=unit, input_uri=f"s3://in/{unit}", shards=[], samples_written=samples, seconds=1.0)

    for unit in ("u1", "u2", "u3"):
        write_progress(out, record(unit, 1))
    records = ProgressRecords(out)
    assert [progress.unit for progress in records.read()] == ["u1", "u2", "u3"]
    assert sorted(fetched) == ["u1.json", "u2.json", "u3.json"]

    fetched.clear()
    assert [progress.unit for progress in records.read()] == ["u1", "u2", "u3"]
    assert fetched == []  # nothing changed: one listing, no GET

    write_progress(out, record("u2", 5))  # the unit was redone
    write_progress(out, record("u4", 1))
    storage.delete(storage.join(out, "_progress", "u1.json"))
    fetched.clear()
    assert [(progress.unit, progress.samples_written) for progress in records.read()] == [("u2", 5), ("u3", 1),
                                                                                         ("u4", 1)]
    assert sorted(fetched) == ["u2.json", "u4.json"]
    assert records.read() == list_progress(out)
