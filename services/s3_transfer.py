"""Managed S3 transfers of local files (boto3/s3transfer): parts sent and fetched by a pool of threads.

`services.storage.upload_file` / `download_file` route `s3://` through here, so checkpoints, exports and
`publish_dir` / `download_published_dir` use it. s3fs signs and sends a file's parts from its one
event-loop thread and reads an object block after block; boto3's transfer manager keeps
`transfer_max_concurrency` parts or ranges in flight from threads that release the GIL while hashing
and sending. That pays where a transfer waits on the network or the server and cores are free; on
two saturated cores a transfer is CPU-bound and both move about as fast (see the README's figures
from `benchmarks/checkpoint_transfer.py`).

An upload of `transfer_threshold_bytes` or more is a multipart upload, which S3 shows only once it
is completed (a failed one is aborted by s3transfer); a smaller one is a single PUT. A download
lands in a temp file that replaces the target only when whole. Retries follow the storage policy of
the s3fs client: botocore retries each request (`storage.botocore_config_kwargs`), and the caller's
`storage.retry_transient` keeps the whole transfer going until its deadline; s3transfer's own re-reads
of a broken download stream are off, so there is one time bound.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

from services import storage

_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _client_key(settings: dict[str, Any], config: storage.StorageConfig) -> tuple:
    # boto3 clients are thread-safe but not fork-safe: one per process, endpoint, keys and connection settings.
    secret_digest = hashlib.sha256((settings["secret"] or "").encode()).hexdigest()
    return (os.getpid(), settings["endpoint_url"], settings["region"], settings["key"], secret_digest, config.anon,
            config.connect_timeout_seconds, config.read_timeout_seconds, config.retry_mode, config.request_attempts,
            config.transfer_max_concurrency)


def _new_client(settings: dict[str, Any], config: storage.StorageConfig) -> Any:
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    botocore_config = Config(
        # The same retries and timeouts as the s3fs client: botocore per request, storage.retry_transient's deadline.
        **storage.botocore_config_kwargs(config),
        # One connection per part in flight, or urllib3 discards and reopens connections.
        max_pool_connections=config.transfer_max_concurrency,
        signature_version=UNSIGNED if config.anon else None,
    )
    # A session per client: boto3's default session is not safe to create clients from in several threads.
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings["endpoint_url"],
        region_name=settings["region"],
        aws_access_key_id=None if config.anon else settings["key"],
        aws_secret_access_key=None if config.anon else settings["secret"],
        config=botocore_config,
    )


def client(config: storage.StorageConfig) -> Any:
    """The boto3 S3 client for these settings in this process (the s3fs filesystem's endpoint and keys)."""
    settings = storage._s3_settings(config)
    key = _client_key(settings, config)
    with _clients_lock:
        found = _clients.get(key)
        if found is None:
            found = _clients[key] = _new_client(settings, config)
    return found


def transfer_config(config: storage.StorageConfig) -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=config.transfer_threshold_bytes,
        multipart_chunksize=config.transfer_chunk_bytes,
        max_concurrency=config.transfer_max_concurrency,
        num_download_attempts=1,
        use_threads=True,
        preferred_transfer_client="classic",  # the same threads everywhere, whether or not awscrt is installed
    )


def _bucket_and_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def upload_file(local: str | Path, path: str, config: storage.StorageConfig) -> None:
    """Upload `local` to the S3 object `bucket/key` (no retries; see the module docstring)."""
    bucket, key = _bucket_and_key(path)
    client(config).upload_file(str(local), bucket, key, Config=transfer_config(config))


def download_file(path: str, local: str | Path, config: storage.StorageConfig) -> None:
    """Download the S3 object `bucket/key` to `local`, which appears whole or not at all (no retries)."""
    from boto3.exceptions import RetriesExceededError as Boto3RetriesExceeded
    from s3transfer.exceptions import RetriesExceededError as TransferRetriesExceeded

    bucket, key = _bucket_and_key(path)
    try:
        # A seekable file lets s3transfer write the ranges it fetches in parallel at their offsets.
        with storage._local_staging_file(os.path.abspath(local)) as handle:
            client(config).download_fileobj(bucket, key, handle, Config=transfer_config(config))
    except (Boto3RetriesExceeded, TransferRetriesExceeded) as exc:
        # The broken stream is the cause; re-raising it lets retry_transient see a transient failure.
        raise exc.last_exception from exc
