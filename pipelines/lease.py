"""One writer per cache: the encode job holds a lease object on its output while it writes.

`<out>/_lease.json` for a job over all units, `<out>/_lease.<index>-of-<count>.json` for a partition,
so that the `count` partitioned jobs of one cache keep running side by side. A lease is created with
an S3 conditional PUT (`If-None-Match: *`) and renewed with `If-Match: <ETag>`, so the server
decides every race; it names its holder (Ray job submission id, host, pid) and expires
`ttl_seconds` after its last renewal. A second job finds a live lease and refuses, naming the
holder; an expired one (a crashed job) is taken over; `break_lease` takes a live one.

After taking its own lease a job also looks at the others and backs off from a live one it
overlaps (all units vs. any partition, or partitions of another count). Both sides write before
they look, so of two overlapping jobs starting together at least one sees the other (both may
back off; neither writes). Expiry compares the holder's clock with the reader's: keep hosts'
clocks within a small fraction of `ttl_seconds`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid

from pydantic import ValidationError

from pipelines.config import LeaseConfig, PartitionConfig
from services import storage
from services.cache.layout import LEASE_FILE
from services.config import StrictModel

logger = logging.getLogger(__name__)

LEASE_FORMAT = "hybriddit.lease/1"


class LeaseHeldError(RuntimeError):
    """Another live job holds the cache (or an overlapping part of it)."""


class LeaseLostError(RuntimeError):
    """This job's lease was broken or taken over, or could not be renewed before it expired."""


class LeaseRecord(StrictModel):
    """The lease object: who holds it and until when."""

    format: str = LEASE_FORMAT
    token: str  # unique per acquisition: tells our own write from another job's
    holder: str
    host: str
    pid: int
    scope: str
    started_at: float
    renewed_at: float
    expires_at: float

    def describe(self) -> str:
        return (f"{self.holder} ({self.scope}; renewed {time.time() - self.renewed_at:.0f} s ago, "
                f"expires in {self.expires_at - time.time():.0f} s)")


def lease_name(partition: PartitionConfig | None) -> str:
    return "_lease.json" if partition is None else f"_lease.{partition.index}-of-{partition.count}.json"


def _scope(partition: PartitionConfig | None) -> str:
    return "all units" if partition is None else f"partition {partition.index} of {partition.count}"


def _overlaps(mine: re.Match, other: re.Match) -> bool:
    """Whether two leases' units can overlap: unless both are partitions of the same count (then they differ)."""
    return mine["count"] is None or other["count"] is None or mine["count"] != other["count"]


def this_process() -> str:
    """Who holds a lease: the Ray job submission id when run by `ray job submit`, and host + pid."""
    job_config = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    submission = job_config.get("metadata", {}).get("job_submission_id")
    where = f"pid {os.getpid()} on {socket.gethostname()}"
    return f"Ray job {submission} ({where})" if submission else where


class WriterLease:
    """Take, renew (in a thread) and release the lease of `out_uri` (or of one partition of it)."""

    def __init__(self, out_uri: str, partition: PartitionConfig | None, config: LeaseConfig,
                 holder: str | None = None) -> None:
        self.out_uri = out_uri
        self.name = lease_name(partition)
        self.uri = storage.join(out_uri, self.name)
        self.config = config
        now = time.time()
        self.record = LeaseRecord(token=uuid.uuid4().hex, holder=holder or this_process(), host=socket.gethostname(),
                                  pid=os.getpid(), scope=_scope(partition), started_at=now, renewed_at=now,
                                  expires_at=now + config.ttl_seconds)
        self._version: str | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    # ----------------------------------------------------------------------- taking it

    def _read(self, uri: str) -> tuple[LeaseRecord, str]:
        data, version = storage.read_versioned(uri)
        try:
            return LeaseRecord.model_validate_json(data), version
        except ValidationError as error:
            raise storage.StorageError(f"{uri} is not a {LEASE_FORMAT} lease ({error.error_count()} problems): "
                                       "remove it, or pass --break-lease to overwrite it") from None

    def _encoded(self) -> bytes:
        return self.record.model_dump_json(indent=2).encode()

    def acquire(self) -> None:
        """Take the lease or raise `LeaseHeldError` naming the live holder; then start renewing it."""
        try:
            self._version = storage.write_if(self.uri, self._encoded(), version=None)
        except storage.PreconditionFailedError:
            self._take_over()
        try:
            self._check_overlapping()
        except BaseException:
            self.release()
            raise
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="writer-lease", daemon=True)
        self._renewer.start()
        logger.info("took the writer lease %s (%s, expires after %.0f s without renewal)", self.uri,
                    self.record.holder, self.config.ttl_seconds)

    def _take_over(self) -> None:
        """The lease object exists: ours (a retried create whose first answer was lost), expired, or live."""
        try:
            current, version = self._read(self.uri)
        except storage.StorageNotFoundError:  # released between our create and this read: create it again
            current, version = None, None
        except storage.StorageError:
            if not self.config.break_lease:
                raise
            current, version = None, storage.read_versioned(self.uri)[1]
        if current is not None and current.token == self.record.token:
            self._version = version
            return
        if current is not None and current.expires_at > time.time() and not self.config.break_lease:
            raise LeaseHeldError(
                f"{self.out_uri} is being written by {current.describe()}, which holds {self.uri}: wait for it to "
                f"finish, or, if it is dead, wait until the lease expires or pass --break-lease "
                f"(lease.break_lease=true)"
            )
        if version is not None:
            why = "breaking" if current is not None and current.expires_at > time.time() else "taking over"
            logger.warning("%s the writer lease %s of %s", why, self.uri,
                           current.describe() if current is not None else "an unreadable holder")
        try:
            self._version = storage.write_if(self.uri, self._encoded(), version=version)
        except storage.PreconditionFailedError:
            winner, _ = self._read(self.uri)
            raise LeaseHeldError(f"{self.out_uri}: {winner.describe()} took {self.uri} at the same moment") from None

    def _check_overlapping(self) -> None:
        mine = LEASE_FILE.match(self.name)
        for uri in storage.list_uris(self.out_uri):
            other = LEASE_FILE.match(uri.rsplit("/", 1)[-1])
            if other is None or other.group(0) == self.name or not _overlaps(mine, other):
                continue
            try:
                holder, _ = self._read(uri)
            except storage.StorageNotFoundError:
                continue  # released meanwhile
            if holder.expires_at <= time.time():
                continue
            if self.config.break_lease:
                logger.warning("--break-lease: writing although %s holds the overlapping lease %s",
                               holder.describe(), uri)
                continue
            raise LeaseHeldError(
                f"{self.out_uri} is being written by {holder.describe()}, which holds {uri}, overlapping "
                f"{self.record.scope}: wait for it, run with matching partitions, or pass --break-lease if it is dead"
            )

    # ----------------------------------------------------------------------- keeping it

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.config.renew_every_seconds):
            try:
                self.renew()
            except LeaseLostError:
                return
            except storage.StorageError as error:  # storage away longer than its retries: try again next time
                if time.time() >= self.record.expires_at:
                    self._lost = f"it could not be renewed before it expired ({error})"
                    return
                logger.warning("could not renew the writer lease %s (%s); retrying in %.0f s", self.uri, error,
                               self.config.renew_every_seconds)

    def renew(self) -> None:
        """Push the expiry forward, only if the lease object is still the one we wrote."""
        now = time.time()
        record = self.record.model_copy(update={"renewed_at": now, "expires_at": now + self.config.ttl_seconds})
        try:
            self._version = storage.write_if(self.uri, record.model_dump_json(indent=2).encode(), version=self._version)
        except storage.PreconditionFailedError:
            try:
                current, version = self._read(self.uri)
            except storage.StorageNotFoundError:
                current = None
            if current is None or current.token != record.token:
                self._lost = f"{current.describe() if current else 'someone'} broke or took it over"
                raise LeaseLostError(self._lost) from None
            self._version = version  # our own renewal, answered late and retried
            record = current
        self.record = record

    def check(self) -> None:
        """Raise `LeaseLostError` if the lease is gone: call before every write that publishes."""
        if self._lost is not None:
            raise LeaseLostError(f"this job lost its writer lease {self.uri}: {self._lost}; it stopped before "
                                 "publishing more (run it again once the other writer is done)")

    # ----------------------------------------------------------------------- giving it back

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still ours."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        try:
            current, _ = self._read(self.uri)
        except storage.StorageNotFoundError:
            return
        # Read, compare, delete: a takeover in between (only after expiry or --break-lease) is lost.
        if current.token == self.record.token:
            storage.delete(self.uri)

    def __enter__(self) -> WriterLease:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()
