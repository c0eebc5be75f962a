"""A stuck read fails the step within data.batch_timeout_s instead of hanging the rank (and with it the DDP group).

The stall is real: the test's S3 server is frozen with SIGSTOP (connections are still accepted by the
kernel, so every request waits for an answer that never comes) and thawed with SIGCONT afterwards.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from pipelines.demo.synthetic_cache import TEXT_DIM, write_tiny_cache
from trainer.data import DataTimeoutError, TrainingStream, index_shards

BATCH_TIMEOUT_S = 3.0


@pytest.fixture
def s3_cache_shards(s3_server):
    root = s3_server.uri("data-timeout", "cache")
    write_tiny_cache(root, shard_sizes=[8, 8], sides=[8, 8])
    return index_shards([root])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("loader_process", [False, True], ids=["threads", "loader-process"])
def test_a_stalled_storage_server_fails_the_batch_within_the_timeout(s3_server, s3_cache_shards, loader_process):
    stream = TrainingStream(s3_cache_shards, seed=0, rank=0, world_size=1, batch_per_rank=4, window_shards=1,
                            placeholder_text=np.zeros((1, TEXT_DIM), np.float32), loader_process=loader_process,
                            batch_timeout_s=BATCH_TIMEOUT_S)
    batches = iter(stream)
    pid = s3_server.server.pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DataTimeoutError, match="batch_timeout_s"):
            next(batches)
        waited = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
        batches.close()
    # The loader process's spawn (~10 s on 2 busy cores) comes on top of the timeout; S3's own read timeout is 60 s.
    assert BATCH_TIMEOUT_S <= waited < BATCH_TIMEOUT_S + (40 if loader_process else 15)
