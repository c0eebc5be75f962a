"""S3 outages against the real SeaweedFS server: it is stopped and started again on the same ports and data.

Reads and writes wait a stopped server out up to the retry deadline, then fail naming the endpoint;
the train reader never turns an outage into placeholders. The job-level outages are in the slow
tests next to each job (`tests/pipelines`, `tests/trainer`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from pipelines.demo.synthetic_cache import TEXT_DIM, write_tiny_cache
from services import storage
from tests.integration.test_storage_s3 import payload
from trainer.data import TrainingStream, index_shards

WAITS_OUT = {"retry_deadline_seconds": 60, "backoff_seconds": 0.2, "max_backoff_seconds": 1.0}


def training_stream(cache_uri: str, *, loader_process: bool) -> TrainingStream:
    return TrainingStream(index_shards([cache_uri]), seed=5, rank=0, world_size=1, batch_per_rank=4,
                          window_shards=2, placeholder_text=np.zeros((1, TEXT_DIM), np.float32),
                          loader_process=loader_process)


def first_batches(stream: TrainingStream, count: int) -> list[list[str]]:
    batches = iter(stream)
    return [next(batches)["keys"] for _ in range(count)]


def test_a_read_issued_while_the_server_is_down_succeeds_once_it_is_back(s3_server, prefix):
    uri = storage.join(prefix, "object.bin")
    storage.write_bytes(uri, payload(uri, 300_000))
    config = s3_server.config(**WAITS_OUT)
    with s3_server.stopped(restart_after=5) as outage:
        started = time.monotonic()
        data = storage.read_bytes(uri, config)
        waited = time.monotonic() - started
    assert data == payload(uri, 300_000)
    assert outage.back_at is not None and waited >= 4  # it really waited for the restart
    assert time.monotonic() - outage.back_at < 20  # and came back within a few backoffs of it


def test_a_streamed_read_interrupted_by_an_outage_continues_where_it_stopped(s3_server, prefix):
    data = payload("streamed", 2 * storage.MULTIPART_CHUNK_BYTES + 12345)  # more than one read-ahead block
    uri = storage.join(prefix, "streamed.bin")
    storage.write_bytes(uri, data)
    with storage.open_uri(uri, "rb", s3_server.config(**WAITS_OUT)) as stream:
        head = stream.read(2**20)
        with s3_server.stopped(restart_after=5):
            rest = stream.read()  # the next blocks are fetched while the server is down
    assert head + rest == data


def test_train_reader_waits_out_an_outage_and_yields_the_batches_of_an_uninterrupted_read(s3_server, prefix):
    write_tiny_cache(prefix, shard_sizes=[8, 8, 8, 8])
    expected = first_batches(training_stream(prefix, loader_process=False), 6)
    stream = training_stream(prefix, loader_process=False)
    with s3_server.stopped(restart_after=5):
        got = first_batches(stream, 6)  # every shard is fetched while the server is down
    assert got == expected
    assert not stream.skipped, "an outage became placeholders"


def test_past_the_deadline_reads_listings_and_the_train_reader_fail_naming_the_endpoint(
        s3_server, prefix, monkeypatch):
    uri = storage.join(prefix, "object.bin")
    storage.write_bytes(uri, b"x")
    write_tiny_cache(storage.join(prefix, "cache"), shard_sizes=[8, 8])
    # The loader process reads with the storage settings of its environment, as the train job's workers do.
    monkeypatch.setenv(storage.RETRY_DEADLINE_ENV, "3")
    stream = training_stream(storage.join(prefix, "cache"), loader_process=True)
    with s3_server.stopped():
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailableError) as failure:
            storage.read_bytes(uri, s3_server.config(retry_deadline_seconds=3, backoff_seconds=0.2))
        elapsed = time.monotonic() - started
        with pytest.raises(storage.StorageUnavailableError, match=s3_server.endpoint_url):
            first_batches(stream, 1)
        # An outage is neither a missing object nor an empty prefix (a resume would start from scratch).
        short = s3_server.config(retry_deadline_seconds=1, backoff_seconds=0.2)
        with pytest.raises(storage.StorageUnavailableError, match="cannot check"):
            storage.exists(uri, short)
        with pytest.raises(storage.StorageUnavailableError, match="cannot list"):
            storage.list_uris(prefix, recursive=True, config=short)
    assert 3 <= elapsed < 15
    message = str(failure.value)
    assert s3_server.endpoint_url in message and uri in message and "hybriddit stack up" in message
    assert not stream.skipped


def test_a_write_during_an_outage_appears_whole_once_the_server_is_back_and_never_half(s3_server, prefix):
    data = payload("outage-write", 2 * storage.MULTIPART_CHUNK_BYTES + 2**20)  # a multipart upload
    whole, refused = storage.join(prefix, "whole.bin"), storage.join(prefix, "refused.bin")
    with s3_server.stopped(restart_after=6):
        with pytest.raises(storage.StorageUnavailableError):
            storage.write_bytes(refused, data, s3_server.config(retry_deadline_seconds=1, backoff_seconds=0.2))
        writer = threading.Thread(target=storage.write_bytes, args=(whole, data, s3_server.config(**WAITS_OUT)))
        writer.start()
        writer.join(timeout=120)
    assert not writer.is_alive()
    assert storage.read_bytes(whole) == data
    assert storage.list_uris(prefix, recursive=True) == [whole]  # the refused write left nothing behind
