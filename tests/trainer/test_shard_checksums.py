"""The train reader checks each shard against the size and sha256 its manifest records (real S3 server)."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from pipelines.demo.synthetic_cache import TEXT_DIM, write_tiny_cache
from services import storage
from services.cache.reader import CorruptCacheError
from trainer.data import PLACEHOLDER_KEY, TrainingStream, index_shards

NULL_TEXT = np.zeros((1, TEXT_DIM), np.float32)


@pytest.fixture
def s3_cache(s3_server, request):
    root = s3_server.uri("shard-checksums", f"{request.node.name}-{time.monotonic_ns()}")
    keys = write_tiny_cache(root, shard_sizes=[8, 8, 8, 8])
    return root, keys


def flip_a_latent_byte(uri: str) -> None:
    """Change one byte inside the first sample's latent payload: the tar still parses, the values differ."""
    data = bytearray(storage.read_bytes(uri))
    latent_at = data.index(b"latent.npy")
    payload_at = latent_at + 512 + 200  # past the member's header and the .npy header, inside the fp16 values
    data[payload_at] ^= 0x40
    storage.write_bytes(uri, bytes(data))


def epoch(shards, **kwargs):
    training_stream = TrainingStream(shards, seed=1, rank=0, world_size=1, batch_per_rank=4, window_shards=2,
                                     placeholder_text=NULL_TEXT, **kwargs)
    batches = iter(training_stream)
    return training_stream, [next(batches) for _ in range(len(training_stream.plan(0)))]


def test_a_shard_whose_bytes_differ_from_the_manifest_becomes_checksum_mismatch_placeholders(s3_cache):
    root, keys = s3_cache
    shards = index_shards([root])
    assert all(shard.sha256 is not None and shard.num_bytes for shard in shards)
    flip_a_latent_byte(shards[2].uri)

    training_stream, batches = epoch(shards)
    trained = [key for batch in batches for key in batch["keys"] if key != PLACEHOLDER_KEY]
    placeholders = sum(key == PLACEHOLDER_KEY for batch in batches for key in batch["keys"])
    # Every sample of the damaged shard stands in as a zero-weight placeholder; no other sample is lost.
    assert placeholders == shards[2].num_samples == 8
    assert training_stream.skipped == {"checksum_mismatch": 8}
    assert sum(int((batch["weights"] == 0).sum()) for batch in batches) == 8
    assert sorted(trained) == sorted(key for key in keys if not key.startswith("unit002"))


def test_a_shard_cut_short_is_a_checksum_mismatch_too(s3_cache):
    root, _ = s3_cache
    shards = index_shards([root])
    storage.write_bytes(shards[0].uri, storage.read_bytes(shards[0].uri)[:-1024])  # drops the end-of-archive only
    training_stream, _ = epoch(shards)
    assert training_stream.skipped == {"checksum_mismatch": 8}


@pytest.mark.parametrize("loader_process", [False, True], ids=["threads", "loader-process"])
def test_a_checksum_mismatch_fails_the_job_with_fail_on_corrupt(s3_cache, loader_process):
    root, _ = s3_cache
    shards = index_shards([root])
    flip_a_latent_byte(shards[1].uri)
    with pytest.raises(CorruptCacheError, match=rf"{re.escape(shards[1].uri)}: checksum_mismatch: .*sha256"):
        epoch(shards, fail_on_corrupt=True, loader_process=loader_process)
