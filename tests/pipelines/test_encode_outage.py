"""The encode graph's storage writes (shards, progress, manifest) against a real S3 server stopped mid-run.

The same stages as the Ray job, run in-process by `run_local`, so that the outage can be placed
between two units without a Ray cluster; the Ray job's own outage test is in `test_encode_job.py`.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest

from pipelines.demo.photos import write_photo_folder
from pipelines.local_loop import run_local
from services import storage
from services.cache.manifest import list_progress, read_manifest
from tests.pipelines.test_graph_units import cached_samples, job_config


@pytest.mark.slow
def test_a_30_s_s3_outage_between_units_is_waited_out_and_gives_the_uninterrupted_cache(s3_server, tmp_path,
                                                                                      caplog):
    write_photo_folder(tmp_path / "corpus")
    straight, interrupted = s3_server.uri("encode-outage", "straight"), s3_server.uri("encode-outage", "outage")
    # One photo per unit: many small writes, spread over the run.
    run_local(job_config(tmp_path / "corpus", straight, source={"files_per_unit": 1}))
    job = job_config(tmp_path / "corpus", interrupted, source={"files_per_unit": 1})
    caplog.set_level(logging.WARNING, logger="services.storage")
    results = []
    runner = threading.Thread(target=lambda: results.append(run_local(job)))
    started = time.monotonic()
    runner.start()
    while not list_progress(interrupted):
        assert runner.is_alive(), "the run ended before any unit finished"
        time.sleep(0.05)
    units_before = len(list_progress(interrupted))
    with s3_server.stopped(restart_after=30) as outage:
        pass  # the block ends when the server is back, 30 s after it stopped
    runner.join(timeout=300)
    seconds = time.monotonic() - started
    [summary] = results
    assert units_before < summary.units_selected, "every unit finished before the outage"
    assert "retrying" in caplog.text, "the outage missed the run's storage calls"
    keys = sorted(sample.key for sample in cached_samples(interrupted))
    assert keys == sorted(sample.key for sample in cached_samples(straight)) and len(set(keys)) == len(keys)
    assert summary.units_failed == {} and summary.units_finished == summary.units_selected
    progress = list_progress(interrupted)
    assert len(progress) == summary.units_selected and sum(p.samples_written for p in progress) == len(keys)
    assert read_manifest(interrupted).num_samples == len(keys)
    assert storage.list_uris(storage.join(interrupted, "shards"), recursive=True) == [
        uri.replace(straight, interrupted)
        for uri in storage.list_uris(storage.join(straight, "shards"), recursive=True)
    ]
    print(f"outage {outage.seconds:.1f} s after {units_before} of {summary.units_selected} units: "
          f"run {seconds:.0f} s")
