"""One writer per cache: the encode job's writer lease on a real S3 server (SeaweedFS on loopback).

Jobs run through `run_encode` (the driver that the Ray graph and the local loop share) with the local
loop's encoders; a crashed holder is a real process killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.config import LeaseConfig, PartitionConfig
from pipelines.demo.photos import write_photo_folder
from pipelines.job import run_encode
from pipelines.lease import LeaseHeldError, LeaseLostError, WriterLease, lease_name
from pipelines.local_loop import LocalEncoder, run_local
from services import storage
from services.cache import layout
from services.cache.manifest import read_manifest
from tests.pipelines.test_graph_units import cached_samples, job_config

REPO = Path(__file__).resolve().parents[2]
SHORT = LeaseConfig(ttl_seconds=4.0, renew_every_seconds=1.0)


@pytest.fixture
def folder(tmp_path) -> Path:
    write_photo_folder(tmp_path / "corpus")
    return tmp_path / "corpus"


@pytest.fixture
def out(s3_server, request) -> str:
    return s3_server.uri("leases", f"{request.node.name}-{time.monotonic_ns()}")


def holder_process(out_uri: str, ttl: float, partition: PartitionConfig | None = None) -> subprocess.Popen:
    """Another job's driver: a real process that takes the lease of `out_uri`, says so, and keeps renewing it."""
    code = textwrap.dedent(f"""
        import time
        from pipelines.config import LeaseConfig, PartitionConfig
        from pipelines.lease import WriterLease
        partition = {partition.model_dump() if partition else None!r}
        lease = WriterLease({out_uri!r}, partition and PartitionConfig(**partition),
                            LeaseConfig(ttl_seconds={ttl}, renew_every_seconds={ttl / 4}),
                            holder="Ray job raysubmit_other")
        lease.acquire()
        print("held", flush=True)
        time.sleep(600)
    """)
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    assert process.stdout.readline().strip() == "held", "the holder process did not take the lease"
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_conditional_writes_create_once_and_replace_only_an_unchanged_object(out, tmp_path, where):
    uri = storage.join(out if where == "s3" else str(tmp_path / "out"), "object.json")
    first = storage.write_if(uri, b"one", version=None)
    with pytest.raises(storage.PreconditionFailedError, match="it exists"):
        storage.write_if(uri, b"two", version=None)
    second = storage.write_if(uri, b"three", version=first)
    with pytest.raises(storage.PreconditionFailedError, match="it changed"):
        storage.write_if(uri, b"four", version=first)  # a writer holding a stale version loses
    assert storage.read_versioned(uri) == (b"three", second)


def test_a_second_job_on_the_same_cache_is_refused_naming_the_running_job(folder, out):
    holder = holder_process(out, ttl=60.0)
    try:
        with pytest.raises(LeaseHeldError, match=r"is being written by Ray job raysubmit_other \(all units; .*"
                                                 r"pass --break-lease"):
            run_local(job_config(folder, out, lease=SHORT.model_dump()))
        # Refused before touching anything: no plan, no null text, no shard.
        assert storage.list_uris(out) == [storage.join(out, lease_name(None))]
    finally:
        stop(holder)


def test_a_lease_left_by_a_killed_job_expires_and_is_taken_over(folder, out, caplog):
    job = job_config(folder, out, lease=SHORT.model_dump())
    encoder = LocalEncoder(job)
    holder = holder_process(out, ttl=10.0)
    stop(holder)  # the driver dies without releasing its lease
    with pytest.raises(LeaseHeldError, match="raysubmit_other"):
        run_encode(job, encoder.card, encoder.execute)  # not expired yet
    expires_at = storage.read_json(storage.join(out, lease_name(None)))["expires_at"]
    time.sleep(max(0.0, expires_at - time.time()) + 0.5)
    with caplog.at_level("WARNING", logger="pipelines.lease"):
        summary = run_encode(job, encoder.card, encoder.execute)
    assert any(record.message.startswith(f"taking over the writer lease {out}/_lease.json of Ray job "
                                         "raysubmit_other") for record in caplog.records)
    assert summary.units_finished == 3 and read_manifest(out).num_samples == 7
    assert not storage.exists(storage.join(out, lease_name(None)))  # released at the end


def test_break_lease_takes_a_live_lease_and_the_old_holder_stops_publishing(folder, out):
    old = WriterLease(out, None, LeaseConfig(ttl_seconds=600, renew_every_seconds=300), holder="Ray job raysubmit_old")
    old.acquire()
    try:
        summary = run_local(job_config(folder, out, lease={"break_lease": True}))
        assert summary.units_finished == 3 and len(cached_samples(out)) == 7
        with pytest.raises(LeaseLostError, match="broke or took it over"):
            old.renew()
        with pytest.raises(LeaseLostError, match=f"this job lost its writer lease {out}/_lease.json"):
            old.check()
    finally:
        old.release()
    assert not storage.exists(storage.join(out, lease_name(None)))


def test_a_job_whose_lease_is_broken_stops_before_publishing_another_unit(folder, out):
    job = job_config(folder, out, lease=SHORT.model_dump())
    encoder = LocalEncoder(job)
    breaker = WriterLease(out, None, LeaseConfig(break_lease=True), holder="Ray job raysubmit_breaker")

    def execute_then_get_broken(units, card):
        for index, row in enumerate(encoder.execute(units, card)):
            if index == 0:  # another job breaks the lease while this one is running
                breaker.acquire()
                time.sleep(SHORT.renew_every_seconds * 2.5)  # this job's next renewal finds it gone
            yield row

    try:
        with pytest.raises(LeaseLostError, match="Ray job raysubmit_breaker .* broke or took it over"):
            run_encode(job, encoder.card, execute_then_get_broken)
    finally:
        breaker.release()
    assert not storage.list_uris(layout.progress_dir_uri(out))
    assert not storage.exists(layout.manifest_uri(out))


def test_partitioned_jobs_hold_one_lease_each_and_overlapping_jobs_are_refused(folder, out):
    partition = PartitionConfig(index=0, count=2)
    holder = holder_process(out, ttl=60.0, partition=partition)
    try:
        # The other partition of the same split runs beside it...
        summary = run_local(job_config(folder, out, partition={"index": 1, "count": 2}))
        assert summary.units_finished == 1
        # ...but a job over all units, or partitions of another split, would overlap its units.
        with pytest.raises(LeaseHeldError, match=rf"raysubmit_other \(partition 0 of 2; .*\), which holds "
                                                 rf"{out}/_lease.0-of-2.json, overlapping all units"):
            run_local(job_config(folder, out))
        with pytest.raises(LeaseHeldError, match="overlapping partition 1 of 3"):
            run_local(job_config(folder, out, partition={"index": 1, "count": 3}))
        with pytest.raises(LeaseHeldError, match="partition 0 of 2"):
            run_local(job_config(folder, out, partition={"index": 0, "count": 2}))
        # The refused jobs left no lease behind.
        names = [uri.rsplit("/", 1)[-1] for uri in storage.list_uris(out)]
        assert [name for name in names if name.startswith("_lease")] == ["_lease.0-of-2.json"]
    finally:
        stop(holder)


def test_renewal_must_be_at_most_half_the_ttl():
    with pytest.raises(ValueError, match=r"renew_every_seconds \(60.0\) must be at most half of lease.ttl_seconds"):
        LeaseConfig(ttl_seconds=100, renew_every_seconds=60)
