"""Object storage behind one small API: s3://, file:// (and bare paths), hf:// and http(s):// via fsspec.

S3 endpoint and keys come from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_REGION` or from a `StorageConfig`. One retry policy in two layers: botocore retries each S3
request (`retry_mode` standard or adaptive, `request_attempts`, its own jittered backoff), and
`retry_transient` keeps a whole operation going through transient failures (connection refused,
timeouts, 5xx, throttling) with jittered backoff until `retry_deadline_seconds` have passed, long
enough by default to ride out a restart of the S3 server, then fails with a `StorageUnavailableError`
naming the endpoint. Client errors (missing bucket, wrong keys) fail at once as a `StorageError`
naming the URI and the fix.

Processes that use s3fs must not fork workers that use it too (its event loop is per process):
filesystem instances are cached per process id, and DataLoaders should use the "spawn" context.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any, Literal, TypeVar

import fsspec
import fsspec.asyn
from fsspec.core import split_protocol
from pydantic import Field, SecretStr, ValidationError, field_validator

from services.config import StrictModel

logger = logging.getLogger(__name__)

T = TypeVar("T")

COMPLETE_MARKER = "_COMPLETE.json"
COMPLETE_FORMAT = "hybriddit.complete/1"
# Objects above twice this size are uploaded in parts of this size (S3's minimum part is 5 MiB).
MULTIPART_CHUNK_BYTES = 8 * 2**20
LOCAL_PROTOCOLS = ("file", "local")
RETRY_DEADLINE_ENV = "HYBRIDDIT_STORAGE_RETRY_DEADLINE_SECONDS"
THROTTLING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests"}
TRANSIENT_CODES = THROTTLING_CODES | {"RequestTimeout", "InternalError", "ServiceUnavailable", "OperationAborted"}


def _from_env(name: str, default: Any) -> Callable[[], Any]:
    """A field default that the environment can override (validated like any value: `validate_default`)."""
    return lambda: os.environ.get(name, default)


class StorageConfig(StrictModel):
    """Where S3 lives and how hard to retry; unset fields fall back to the AWS_* environment.

    Jobs build this from their environment, so the retry settings follow it too: botocore's own
    `AWS_RETRY_MODE` and `AWS_MAX_ATTEMPTS`, and `HYBRIDDIT_STORAGE_RETRY_DEADLINE_SECONDS`.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    anon: bool = False
    retry_mode: Literal["standard", "adaptive"] = Field(
        default_factory=_from_env("AWS_RETRY_MODE", "standard"), validate_default=True,
        description="botocore's retry mode for each request (env AWS_RETRY_MODE); adaptive also rate-limits",
    )
    request_attempts: int = Field(
        default_factory=_from_env("AWS_MAX_ATTEMPTS", 3), validate_default=True, ge=1,
        description="botocore's attempts per request, the first included (env AWS_MAX_ATTEMPTS)",
    )
    retry_deadline_seconds: float = Field(
        default_factory=_from_env(RETRY_DEADLINE_ENV, 240.0), validate_default=True, ge=0,
        description=f"how long one operation is retried through transient failures before it fails (env "
                    f"{RETRY_DEADLINE_ENV}); the default rides out a restart of the S3 server; 0: no retry",
    )
    backoff_seconds: float = Field(default=1.0, gt=0, description="first wait between operation attempts; "
                                   "doubles per attempt, jittered")
    max_backoff_seconds: float = Field(default=15.0, gt=0)
    connect_timeout_seconds: float = Field(default=5.0, gt=0)
    read_timeout_seconds: float = Field(default=60.0, gt=0)
    # Managed transfers of whole files (services.s3_transfer: checkpoints, exports, published directories).
    transfer_threshold_bytes: int = Field(default=MULTIPART_CHUNK_BYTES, ge=1,
                                          description="files of at least this size go up in parts, down in ranges")
    transfer_chunk_bytes: int = Field(default=MULTIPART_CHUNK_BYTES, ge=5 * 2**20,
                                      description="part and range size (S3's minimum part is 5 MiB)")
    transfer_max_concurrency: int = Field(default=10, ge=1, description="parts or ranges in flight per file")


class StorageError(RuntimeError):
    """A storage operation that failed; the message names the URI and what to do."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """The object or directory does not exist."""


class StorageUnavailableError(StorageError):
    """The server stayed unreachable (or kept failing with 5xx) for the whole retry deadline."""


class IncompleteDirectoryError(StorageError):
    """A published directory without its completion marker: still uploading, or the upload failed."""


# --------------------------------------------------------------------------- filesystems

_filesystems: dict[tuple, fsspec.AbstractFileSystem] = {}
_filesystems_lock = threading.Lock()


def split_uri(uri: str) -> tuple[str, str]:
    """`s3://b/k` -> ("s3", "b/k"); bare and file:// paths -> ("file", absolute path); URLs stay whole."""
    protocol, path = split_protocol(str(uri))
    if protocol is None or protocol in LOCAL_PROTOCOLS:
        return "file", os.path.abspath(os.path.expanduser(path))
    if protocol in ("http", "https"):
        return protocol, str(uri)
    return protocol, path.rstrip("/") if protocol == "s3" else path


def _resolve(config: StorageConfig | None) -> StorageConfig:
    return config if config is not None else StorageConfig()


def _s3_settings(config: StorageConfig) -> dict[str, Any]:
    secret = config.secret_access_key.get_secret_value() if config.secret_access_key else None
    return {
        "endpoint_url": config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL"),
        "region": config.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        "key": config.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
        "secret": secret or os.environ.get("AWS_SECRET_ACCESS_KEY"),
    }


def botocore_config_kwargs(config: StorageConfig) -> dict[str, Any]:
    """Keyword arguments of `botocore.config.Config` for every S3 client of the project: retries and timeouts."""
    return {
        "retries": {"mode": config.retry_mode, "total_max_attempts": config.request_attempts},
        "connect_timeout": config.connect_timeout_seconds,
        "read_timeout": config.read_timeout_seconds,
    }


def _new_s3_filesystem(settings: dict[str, Any], config: StorageConfig) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs = {"region_name": settings["region"]} if settings["region"] else {}
    fs = s3fs.S3FileSystem(
        endpoint_url=settings["endpoint_url"],
        key=None if config.anon else settings["key"],
        secret=None if config.anon else settings["secret"],
        anon=config.anon,
        client_kwargs=client_kwargs,
        config_kwargs=botocore_config_kwargs(config),
        default_block_size=MULTIPART_CHUNK_BYTES,
        # Another process may publish at any time: a cached listing would hide its objects.
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    # s3fs's own retry loop is off (a class attribute, not a constructor argument): botocore retries
    # requests and `retry_transient` operations, and a third layer would multiply the waits.
    fs.retries = 1
    return fs


def filesystem(uri: str, config: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem serving `uri` (one per protocol, endpoint and keys per process) and its path."""
    config = _resolve(config)
    protocol, path = split_uri(uri)
    if protocol == "s3":
        settings = _s3_settings(config)
        secret_digest = hashlib.sha256((settings["secret"] or "").encode()).hexdigest()
        key = (os.getpid(), protocol, settings["endpoint_url"], settings["region"], settings["key"],
               secret_digest, config.anon, json.dumps(botocore_config_kwargs(config), sort_keys=True))
    else:
        key = (os.getpid(), protocol)
    with _filesystems_lock:
        fs = _filesystems.get(key)
        if fs is None:
            if protocol == "s3":
                fs = _new_s3_filesystem(settings, config)
            else:
                fs = fsspec.filesystem(protocol, skip_instance_cache=True)
            _filesystems[key] = fs
    return fs, path


def endpoint_of(uri: str, config: StorageConfig | None = None) -> str:
    """The server an URI talks to, for messages: the S3 endpoint, or the protocol."""
    protocol, _ = split_uri(uri)
    if protocol != "s3":
        return protocol
    return _s3_settings(_resolve(config))["endpoint_url"] or "the default AWS endpoint"


def _uri_like(reference: str, protocol: str, path: str) -> str:
    """Write `path` back as a URI in the same style as `reference` (bare, file://, s3://, ...)."""
    if protocol == "file":
        return f"file://{path}" if str(reference).startswith(("file://", "local://")) else path
    if protocol in ("http", "https"):
        return path
    return f"{protocol}://{path}"


def join(uri: str, *parts: str) -> str:
    """`join("s3://b/run", "ckpt", "model.safetensors")` -> "s3://b/run/ckpt/model.safetensors"."""
    cleaned = [str(part).strip("/") for part in parts if str(part).strip("/")]
    if split_protocol(str(uri))[0] is None:
        return str(Path(uri, *cleaned))
    return "/".join([str(uri).rstrip("/"), *cleaned])


# --------------------------------------------------------------------------- errors and retries


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _s3_error(exc: BaseException) -> tuple[str | None, int | None]:
    """The S3 error code and HTTP status of the response behind `exc`, if the server answered."""
    from aiohttp import ClientResponseError

    for item in _exception_chain(exc):
        response = getattr(item, "response", None)  # botocore's ClientError, which s3fs wraps
        if isinstance(response, dict) and "Error" in response:
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return response["Error"].get("Code"), status
        if isinstance(item, ClientResponseError):  # http(s):// and hf:// answers
            return None, item.status
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying may help: connection errors, timeouts, 5xx and throttling; never 4xx."""
    import aiohttp
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError
    from fsspec.exceptions import FSTimeoutError

    code, status = _s3_error(exc)
    if code is not None or status is not None:
        return code in TRANSIENT_CODES or (status is not None and (status >= 500 or status == 429))
    transient_types: tuple[type[BaseException], ...] = (
        BotoConnectionError, HTTPClientError, FSTimeoutError, ConnectionError, TimeoutError, asyncio.TimeoutError,
    )
    transient_types += (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)
    return any(isinstance(item, transient_types) for item in _exception_chain(exc))


def as_storage_error(exc: BaseException, uri: str, action: str, config: StorageConfig | None = None) -> StorageError:
    """Translate a failure into a StorageError that names the URI, the server and the fix (no secrets)."""
    if isinstance(exc, StorageError):
        return exc
    code, status = _s3_error(exc)
    endpoint = endpoint_of(uri, config)
    protocol, path = split_uri(uri)
    bucket = path.split("/", 1)[0] if protocol == "s3" else ""
    if code == "NoSuchBucket" or (protocol == "s3" and "bucket does not exist" in str(exc)):
        return StorageError(
            f"cannot {action} {uri}: bucket '{bucket}' does not exist at {endpoint}: create it first, e.g. "
            f"`aws --endpoint-url {endpoint} s3 mb s3://{bucket}` (the local stack: SeaweedS3.ensure_bucket)"
        )
    if code == "InvalidAccessKeyId":
        return StorageError(
            f"cannot {action} {uri}: the S3 server at {endpoint} rejected the access key (unknown key id): "
            "check AWS_ACCESS_KEY_ID (or StorageConfig.access_key_id)"
        )
    if code == "SignatureDoesNotMatch":
        return StorageError(
            f"cannot {action} {uri}: the S3 server at {endpoint} rejected the request signature: "
            "AWS_SECRET_ACCESS_KEY does not match AWS_ACCESS_KEY_ID"
        )
    if code == "AccessDenied" or status == 403 or isinstance(exc, PermissionError):
        return StorageError(
            f"cannot {action} {uri}: access denied by {endpoint}: check AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, and that this key may access the bucket"
        )
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(
            f"cannot {action} {uri}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(for the local stack, run the command under `hybriddit exec --`)"
        )
    if code in ("NoSuchKey", "404", "NotFound") or status == 404 or isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"cannot {action} {uri}: it does not exist")
    return StorageError(f"cannot {action} {uri}: {type(exc).__name__}: {exc}")


def _backoff(attempt: int, config: StorageConfig) -> float:
    """Wait before operation attempt `attempt + 1`: doubling from `backoff_seconds`, capped, with equal jitter
    (half fixed, half random) so that many clients do not return to a restarted server in step."""
    ceiling = min(config.backoff_seconds * 2 ** (attempt - 1), config.max_backoff_seconds)
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_transient(call: Callable[[], T], uri: str, action: str, config: StorageConfig | None = None) -> T:
    """Run `call`; retry transient failures until the retry deadline, then raise StorageUnavailableError.

    Each S3 request inside `call` has already been retried by botocore; this loop keeps the whole
    operation going while the server is down. Other failures raise at once as a StorageError, and
    local files (nothing to wait for) are never retried. A new attempt never starts after the
    deadline, so an operation fails at most one attempt's time later.
    """
    config = _resolve(config)
    deadline = 0.0 if split_uri(uri)[0] == "file" else config.retry_deadline_seconds
    started = time.monotonic()
    attempts = 0
    while True:
        try:
            return call()
        except Exception as exc:
            attempts += 1
            if not is_transient(exc):
                raise as_storage_error(exc, uri, action, config) from exc
            elapsed = time.monotonic() - started
            if elapsed >= deadline:
                raise StorageUnavailableError(
                    f"cannot {action} {uri}: the server at {endpoint_of(uri, config)} kept failing for "
                    f"{elapsed:.1f} s ({attempts} attempt{'s' * (attempts > 1)}, retry deadline {deadline:g} s; "
                    f"last error {type(exc).__name__}: {exc}): is it running and reachable? (the local stack: "
                    f"`hybriddit stack up`); to ride out longer outages raise {RETRY_DEADLINE_ENV}"
                ) from exc
            delay = min(_backoff(attempts, config), deadline - elapsed)
            logger.warning("retrying %s %s in %.2f s after %s (attempt %d, %.1f s of the %g s deadline left)",
                           action, uri, delay, type(exc).__name__, attempts, deadline - elapsed, deadline)
            time.sleep(delay)


# --------------------------------------------------------------------------- single objects


@contextlib.contextmanager
def _local_staging_file(path: str) -> Iterator[IO[bytes]]:
    """A temp file next to `path` that replaces it only if the block succeeds (os.replace is atomic)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    descriptor, temp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


class _RetryingReader(io.RawIOBase):
    """A remote file opened for reading whose reads wait out transient failures like every other operation.

    Retrying a read is safe: fsspec's buffered files move their position only when a read succeeds.
    """

    def __init__(self, handle: IO[bytes], uri: str, config: StorageConfig | None) -> None:
        super().__init__()
        self._handle, self._uri, self._config = handle, uri, config

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return retry_transient(lambda: self._handle.read(size), self._uri, "read", self._config)

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        memoryview(buffer).cast("B")[: len(data)] = data
        return len(data)

    def seekable(self) -> bool:
        return self._handle.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()


@contextlib.contextmanager
def open_uri(uri: str, mode: str = "rb", config: StorageConfig | None = None) -> Iterator[IO[bytes]]:
    """Open an object; in "wb" mode it appears whole when the block ends and not at all if it raises."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"open_uri({uri!r}): mode must be 'rb' or 'wb', not {mode!r}")
    fs, path = filesystem(uri, config)
    protocol, _ = split_uri(uri)
    if mode == "rb":
        handle = retry_transient(lambda: fs.open(path, "rb"), uri, "open", config)
        with handle:
            yield handle if protocol == "file" else _RetryingReader(handle, uri, config)
        return
    if protocol == "file":
        with _local_staging_file(path) as handle:
            yield handle
        return
    with tempfile.NamedTemporaryFile(prefix="hybriddit-upload-", suffix=".partial") as staging:
        yield staging
        staging.flush()
        upload_file(staging.name, uri, config)


def read_bytes(uri: str, config: StorageConfig | None = None) -> bytes:
    fs, path = filesystem(uri, config)
    return retry_transient(lambda: fs.cat_file(path), uri, "read", config)


def write_bytes(uri: str, data: bytes, config: StorageConfig | None = None) -> None:
    """Write one object atomically: a single PUT or a completed multipart upload; locally temp + rename."""
    fs, path = filesystem(uri, config)
    protocol, _ = split_uri(uri)
    if protocol == "file":
        with _local_staging_file(path) as handle:
            handle.write(data)
        return
    extra = {"chunksize": MULTIPART_CHUNK_BYTES} if protocol == "s3" else {}
    retry_transient(lambda: fs.pipe_file(path, data, **extra), uri, "write", config)


def read_json(uri: str, config: StorageConfig | None = None) -> Any:
    raw = read_bytes(uri, config)
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StorageError(f"{uri} is not valid JSON: {exc}") from None


def write_json(uri: str, obj: Any, config: StorageConfig | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2).encode(), config)


def exists(uri: str, config: StorageConfig | None = None) -> bool:
    fs, path = filesystem(uri, config)
    return retry_transient(lambda: fs.exists(path), uri, "check", config)


def _find_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Every file below `path`; s3fs's find also returns an empty directory itself (SeaweedFS keeps those)."""
    return [name for name, info in fs.find(path, detail=True).items() if info["type"] != "directory"]


def list_uris(prefix_uri: str, recursive: bool = False, config: StorageConfig | None = None) -> list[str]:
    """Sorted full URIs under a prefix: its direct children, or every object below it if recursive."""
    fs, path = filesystem(prefix_uri, config)
    protocol, _ = split_uri(prefix_uri)
    lister = (lambda: _find_files(fs, path)) if recursive else (lambda: fs.ls(path, detail=False))
    try:
        paths = retry_transient(lister, prefix_uri, "list", config)
    except StorageNotFoundError:
        return []  # an empty prefix, as S3 sees it
    return sorted(_uri_like(prefix_uri, protocol, item.rstrip("/")) for item in paths)


def _object_version(info: dict[str, Any]) -> str | None:
    """What changes whenever an object is rewritten: S3's ETag, a local file's size, mtime and inode; else None."""
    if info.get("ETag"):
        return str(info["ETag"])
    if "mtime" in info:
        return f"{info.get('size')}-{info['mtime']}-{info.get('ino')}"
    return None


def list_versions(prefix_uri: str, config: StorageConfig | None = None) -> dict[str, str | None]:
    """The direct children of a prefix (files only), sorted, each with its version (see `_object_version`).

    One listing says which objects changed since an earlier one, so a reader can fetch only those.
    """
    fs, path = filesystem(prefix_uri, config)
    protocol, _ = split_uri(prefix_uri)
    try:
        infos = retry_transient(lambda: fs.ls(path, detail=True), prefix_uri, "list", config)
    except StorageNotFoundError:
        return {}  # an empty prefix, as S3 sees it
    files = {_uri_like(prefix_uri, protocol, info["name"]): _object_version(info)
             for info in infos if info["type"] != "directory"}
    return dict(sorted(files.items()))


def delete(uri: str, recursive: bool = False, config: StorageConfig | None = None) -> None:
    """Remove an object (or everything under a prefix if recursive); a missing one is not an error."""
    fs, path = filesystem(uri, config)
    try:
        retry_transient(lambda: fs.rm(path, recursive=recursive), uri, "delete", config)
    except StorageNotFoundError:
        pass


def upload_file(local: str | Path, uri: str, config: StorageConfig | None = None) -> None:
    """Copy a local file to `uri`; the target appears whole or not at all. S3: a managed parallel transfer."""
    protocol, path = split_uri(uri)
    if protocol == "s3":
        from services import s3_transfer

        retry_transient(lambda: s3_transfer.upload_file(local, path, _resolve(config)), uri, "upload to", config)
        return
    fs, path = filesystem(uri, config)
    if protocol == "file":
        with _local_staging_file(path) as handle, open(local, "rb") as source:
            shutil.copyfileobj(source, handle, MULTIPART_CHUNK_BYTES)
        return
    retry_transient(lambda: fs.put_file(str(local), path), uri, "upload to", config)


def download_file(uri: str, local: str | Path, config: StorageConfig | None = None) -> None:
    """Copy an object to a local file; the local file appears whole or not at all. S3: a managed parallel transfer."""
    local = os.path.abspath(local)
    protocol, path = split_uri(uri)
    if protocol == "s3":
        from services import s3_transfer

        retry_transient(lambda: s3_transfer.download_file(path, local, _resolve(config)), uri, "download", config)
        return
    fs, path = filesystem(uri, config)

    def fetch() -> None:
        with _local_staging_file(local) as handle, fs.open(path, "rb") as source:
            shutil.copyfileobj(source, handle, MULTIPART_CHUNK_BYTES)

    retry_transient(fetch, uri, "download", config)


# --------------------------------------------------------------------------- conditional writes


class PreconditionFailedError(StorageError):
    """A conditional write that lost: the object already exists, or changed since its version was read."""


def _s3_bucket_key(path: str) -> tuple[str, str]:
    bucket, _, key = path.partition("/")
    return bucket, key


def _is_precondition_failure(exc: BaseException) -> bool:
    code, status = _s3_error(exc)
    return code == "PreconditionFailed" or status == 412


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    """An exclusive lock on `path`'s sidecar `.<name>.lock` (local conditional writes compare and swap under it)."""
    import fcntl

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f".{os.path.basename(path)}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _content_version(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def read_versioned(uri: str, config: StorageConfig | None = None) -> tuple[bytes, str]:
    """An object's bytes and the version tag (S3 ETag) that `write_if` compares against."""
    protocol, path = split_uri(uri)
    if protocol == "file":
        data = read_bytes(uri, config)
        return data, _content_version(data)
    if protocol != "s3":
        raise StorageError(f"cannot read {uri} with its version: only s3:// and local paths support it")
    fs, _ = filesystem(uri, config)
    bucket, key = _s3_bucket_key(path)

    async def get() -> tuple[bytes, str]:
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        async with response["Body"] as body:
            return await body.read(), response["ETag"]

    return retry_transient(lambda: fsspec.asyn.sync(fs.loop, get), uri, "read", config)


def write_if(uri: str, data: bytes, *, version: str | None, config: StorageConfig | None = None) -> str:
    """Write a small object only if it does not exist (`version=None`) or is still at `version`; returns the new version.

    On S3 this is a conditional PUT (`If-None-Match: *` / `If-Match: <ETag>`), decided by the server;
    locally a compare-and-swap under a file lock. A lost condition raises `PreconditionFailedError`.
    """
    protocol, path = split_uri(uri)
    if protocol == "file":
        with _local_lock(path):
            current = _content_version(read_bytes(uri, config)) if os.path.exists(path) else None
            if current != version:
                raise PreconditionFailedError(f"cannot write {uri}: it {'exists' if version is None else 'changed'}")
            with _local_staging_file(path) as handle:
                handle.write(data)
        return _content_version(data)
    if protocol != "s3":
        raise StorageError(f"cannot write {uri} conditionally: only s3:// and local paths support it")
    fs, _ = filesystem(uri, config)
    bucket, key = _s3_bucket_key(path)
    condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}

    def put() -> str:
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except Exception as exc:
            if _is_precondition_failure(exc):
                raise PreconditionFailedError(
                    f"cannot write {uri}: it {'exists' if version is None else 'changed'}") from exc
            raise

    return retry_transient(put, uri, "write", config)


# --------------------------------------------------------------------------- directories


def _relative_files(local_dir: Path) -> list[str]:
    return sorted(item.relative_to(local_dir).as_posix() for item in local_dir.rglob("*") if item.is_file())


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


class VerificationError(StorageError):
    """A published directory that does not verify: a bad marker, or a file missing or differing from it."""


class MarkerFile(StrictModel):
    """One file a completion marker lists: its path inside the directory, size and sha256."""

    path: str
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("path")
    @classmethod
    def _inside_the_directory(cls, path: str) -> str:
        # A marker names files of its own prefix only: "a/../../x", "/etc/x" or "a\\b" could reach others.
        if "\\" in path:
            raise ValueError(f"{path!r} contains a backslash")
        if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
            raise ValueError(f"{path!r} is an absolute path")
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise ValueError(f"{path!r} has an empty, '.' or '..' segment (it may leave the directory)")
        if path == COMPLETE_MARKER:
            raise ValueError(f"{path!r} is the marker itself")
        return path


class CompleteMarker(StrictModel):
    """`_COMPLETE.json`: the files of a published directory, written after all of them."""

    format: str
    files: list[MarkerFile]
    published_at: float


def complete_marker_of(local_dir: str | Path) -> dict[str, Any]:
    """The marker describing every file below `local_dir` (sizes and sha256), as written by `publish_dir`."""
    local_dir = Path(local_dir)
    files = [
        {"path": name, "size": (local_dir / name).stat().st_size, "sha256": _sha256_of(local_dir / name)}
        for name in _relative_files(local_dir) if name != COMPLETE_MARKER
    ]
    return {"format": COMPLETE_FORMAT, "files": files, "published_at": time.time()}


def write_complete_marker(local_dir: str | Path) -> dict[str, Any]:
    """Mark a local directory complete (e.g. an export), so that readers can verify it like a published one."""
    marker = complete_marker_of(local_dir)
    write_json(str(Path(local_dir, COMPLETE_MARKER)), marker)
    return marker


def _upload_order(name: str) -> tuple[int, str]:
    # Markers of nested directories (an export inside a checkpoint) go after the files they describe.
    return (name.rsplit("/", 1)[-1] == COMPLETE_MARKER, name)


def publish_dir(local_dir: str | Path, uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """Upload a directory, then its `_COMPLETE.json` (files, sizes, sha256) last: readers see all or nothing."""
    local_dir = Path(local_dir)
    marker_uri = join(uri, COMPLETE_MARKER)
    # Re-publishing overwrites files in place: hide the old marker first so no reader mixes versions.
    delete(marker_uri, config=config)
    marker = complete_marker_of(local_dir)
    for name in sorted((entry["path"] for entry in marker["files"]), key=_upload_order):
        upload_file(local_dir / name, join(uri, name), config)
    write_json(marker_uri, marker, config)
    return marker


def is_complete(uri: str, config: StorageConfig | None = None) -> bool:
    """Whether a published directory's completion marker exists."""
    return exists(join(uri, COMPLETE_MARKER), config)


def read_complete_marker(uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """The validated completion marker of a published directory; refuses a directory that has none.

    A marker whose entries are malformed or name files outside `uri` raises `VerificationError`.
    """
    marker_uri = join(uri, COMPLETE_MARKER)
    try:
        raw = read_bytes(marker_uri, config)
    except StorageNotFoundError:
        raise IncompleteDirectoryError(
            f"{uri} has no {COMPLETE_MARKER}: it is still being uploaded or its upload failed; "
            "wait for the writer, or publish it again"
        ) from None
    try:
        marker = json.loads(raw)
    except ValueError as error:
        raise VerificationError(f"{marker_uri} is not valid JSON ({error}); refusing {uri}: publish it again") from None
    if not isinstance(marker, dict) or marker.get("format") != COMPLETE_FORMAT:
        raise VerificationError(f"{marker_uri} is not a {COMPLETE_FORMAT} marker; refusing {uri}")
    try:
        CompleteMarker.model_validate(marker)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
        raise VerificationError(
            f"{marker_uri} is not a valid completion marker ({problems}): a marker may only list files inside "
            f"its own prefix with their size and sha256; refusing {uri}"
        ) from None
    return marker


def _check_entry(uri: str, entry: dict[str, Any], size: int, digest: str) -> None:
    if size != entry["size"] or digest != entry["sha256"]:
        raise VerificationError(
            f"{join(uri, entry['path'])} does not match {COMPLETE_MARKER} (size {size}, expected {entry['size']}; "
            f"sha256 {digest[:12]}..., expected {entry['sha256'][:12]}...): it was changed or damaged after "
            "publishing; publish the directory again"
        )


def _fetch_listed(uri: str, entry: dict[str, Any], fetch: Callable[[str], T]) -> T:
    try:
        return fetch(join(uri, entry["path"]))
    except StorageNotFoundError:
        raise VerificationError(
            f"{join(uri, entry['path'])} is listed in {join(uri, COMPLETE_MARKER)} but does not exist: "
            "it was deleted after publishing; publish the directory again"
        ) from None


def read_published_file(uri: str, name: str, marker: dict[str, Any], config: StorageConfig | None = None) -> bytes:
    """The bytes of file `name` of the published directory `uri`, checked against its `marker` entry."""
    entry = next((entry for entry in marker["files"] if entry["path"] == name), None)
    if entry is None:
        raise VerificationError(f"{join(uri, COMPLETE_MARKER)} does not list {name}: refusing {join(uri, name)}")
    data = _fetch_listed(uri, entry, lambda file_uri: read_bytes(file_uri, config))
    _check_entry(uri, entry, len(data), hashlib.sha256(data).hexdigest())
    return data


def verify_published_dir(uri: str, config: StorageConfig | None = None) -> dict[str, Any]:
    """Check every file a completion marker lists (size and sha256, streamed, nothing kept); returns the marker."""

    def stream_digest(file_uri: str) -> tuple[int, str]:
        digest, size = hashlib.sha256(), 0
        with open_uri(file_uri, config=config) as handle:
            for block in iter(lambda: handle.read(MULTIPART_CHUNK_BYTES), b""):
                digest.update(block)
                size += len(block)
        return size, digest.hexdigest()

    marker = read_complete_marker(uri, config)
    for entry in marker["files"]:
        _check_entry(uri, entry, *_fetch_listed(uri, entry, stream_digest))
    return marker


def download_published_dir(uri: str, local_dir: str | Path, config: StorageConfig | None = None) -> dict[str, Any]:
    """Download the files a completion marker lists and check their sizes and sha256; returns the marker.

    Any file that is missing or differs raises `VerificationError` naming it.
    """
    marker = read_complete_marker(uri, config)
    for entry in marker["files"]:
        target = Path(local_dir, entry["path"])
        _fetch_listed(uri, entry, lambda file_uri, target=target: download_file(file_uri, target, config))
        _check_entry(uri, entry, target.stat().st_size, _sha256_of(target))
    return marker
