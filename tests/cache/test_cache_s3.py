"""The cache on a real S3 server (SeaweedFS on loopback): write, manifest, stream back, status."""

from __future__ import annotations

import json

import numpy as np

from services.cache import layout
from services.cache.manifest import (
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
