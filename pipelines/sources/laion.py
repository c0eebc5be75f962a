"""LAION-style metadata: parquet rows of image URL + caption, images fetched over HTTP.

One unit per (parquet file, row group). Fetches run on a thread pool but samples come out in row
order, and every failed fetch becomes a sample with a failure reason instead of an exception.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import pyarrow.parquet as pq
import requests
from pydantic import Field
from requests.adapters import HTTPAdapter

from pipelines.preprocess import SampleRejected, clean_caption
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.listing import expand_uris, unique_unit_names
from services import storage
from services.cache.names import safe_stem
from services.config import StrictModel

logger = logging.getLogger(__name__)

READ_CHUNK_BYTES = 64 * 1024
RETRIED_STATUSES = {408, 425, 429, 500, 502, 503, 504}


class LaionConfig(StrictModel):
    """Parquet files, their column names and how patiently to fetch images."""

    kind: Literal["laion"] = "laion"
    uris: list[str] = Field(
        min_length=1, description="parquet URIs, `{00000..00031}` ranges, globs or prefixes"
    )
    url_column: str = "URL"
    caption_column: str = "TEXT"
    key_column: str | None = Field(default="key", description="stable ids; `<file stem>-<row>` when absent")
    meta_columns: list[str] = Field(
        default_factory=lambda: ["WIDTH", "HEIGHT", "similarity", "aesthetic", "punsafe", "pwatermark"],
        description="columns copied into each sample's meta when the file has them",
    )
    timeout_s: float = Field(default=10.0, gt=0, description="connect and per-read timeout of one attempt")
    retries: int = Field(
        default=2, ge=0, description="extra attempts after a timeout, connection error or 5xx"
    )
    backoff_s: float = Field(default=0.5, ge=0, description="wait before the first retry; doubles per retry")
    max_bytes: int = Field(default=32 * 2**20, gt=0, description="larger downloads are aborted as too_large")
    concurrency: int = Field(default=16, ge=1, description="parallel fetches per unit")
    user_agent: str = "hybriddit-factory/0.1 (research image-text dataset builder)"


class _FetchFailed(Exception):
    def __init__(self, reason: str, retryable: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def _parquet_file(uri: str, handle: Any) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except Exception as exc:
        raise ValueError(f"{uri} is not a readable parquet file: {exc}") from exc


class LaionSource:
    """Rows of a LAION parquet file, fetched with timeouts, bounded retries and a size cap."""

    def __init__(self, config: LaionConfig) -> None:
        self.config = config

    def list_units(self) -> list[InputUnit]:
        uris = expand_uris(self.config.uris, ".parquet")
        names = unique_unit_names(uris)
        units = []
        for uri in uris:
            with storage.open_uri(uri, "rb") as handle:
                metadata = _parquet_file(uri, handle).metadata
            first_row = 0
            for group in range(metadata.num_row_groups):
                rows = metadata.row_group(group).num_rows
                options = {
                    "row_group": group,
                    "first_row": first_row,
                    "num_rows": rows,
                    "key_prefix": names[uri],
                }
                units.append(InputUnit(f"{names[uri]}__rg{group:04d}", "laion", uri, options))
                first_row += rows
        return units

    def iter_samples(self, unit: InputUnit) -> Iterator[RawSample]:
        rows = self._read_rows(unit)
        with requests.Session() as session, ThreadPoolExecutor(self.config.concurrency) as pool:
            adapter = HTTPAdapter(
                pool_connections=self.config.concurrency, pool_maxsize=self.config.concurrency
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers["User-Agent"] = self.config.user_agent
            # A bounded window of in-flight fetches keeps memory flat and the output in row order.
            pending: deque[Future[RawSample]] = deque()
            try:
                for row in rows:
                    pending.append(pool.submit(self._sample, session, row))
                    if len(pending) >= 2 * self.config.concurrency:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # a consumer that stops early (--limit) should not wait for fetches nobody reads
                for future in pending:
                    future.cancel()

    def _read_rows(self, unit: InputUnit) -> list[dict[str, Any]]:
        with storage.open_uri(unit.uri, "rb") as handle:
            parquet = _parquet_file(unit.uri, handle)
            present = set(parquet.schema_arrow.names)
            for required in (self.config.url_column, self.config.caption_column):
                if required not in present:
                    raise ValueError(
                        f"{unit.uri} has no column {required!r} (columns: {sorted(present)}); "
                        "set url_column / caption_column"
                    )
            wanted = [self.config.url_column, self.config.caption_column, *self.config.meta_columns]
            if self.config.key_column:
                wanted.append(self.config.key_column)
            columns = [name for name in dict.fromkeys(wanted) if name in present]
            table = parquet.read_row_group(unit.options["row_group"], columns=columns)
        rows = table.to_pylist()
        for offset, row in enumerate(rows):
            index = unit.options["first_row"] + offset
            source_key = row.get(self.config.key_column) if self.config.key_column else None
            fallback_key = f"{unit.options['key_prefix']}-{index}"
            row["__key__"] = safe_stem(str(source_key) if source_key not in (None, "") else fallback_key)
            row["__row__"] = index
            row["__uri__"] = unit.uri
        return rows

    def _sample(self, session: requests.Session, row: dict[str, Any]) -> RawSample:
        url = row.get(self.config.url_column)
        meta = {"source": "laion", "url": url, "parquet": row["__uri__"], "row": row["__row__"]}
        meta.update({name: row[name] for name in self.config.meta_columns if row.get(name) is not None})
        key = row["__key__"]
        try:
            caption = clean_caption(row.get(self.config.caption_column))
        except SampleRejected as rejected:
            return RawSample(key, None, None, meta, failure=rejected.reason)
        if not url:
            return RawSample(key, None, caption, meta, failure="missing_url")
        try:
            image_bytes = self._fetch(session, url)
        except _FetchFailed as failed:
            return RawSample(key, None, caption, meta, failure=failed.reason)
        return RawSample(key, image_bytes, caption, meta)

    def _fetch(self, session: requests.Session, url: str) -> bytes:
        """The body of `url`, retrying transient failures with exponential backoff."""
        for attempt in range(self.config.retries + 1):
            try:
                return self._fetch_once(session, url)
            except _FetchFailed as failed:
                if not failed.retryable or attempt == self.config.retries:
                    raise
                delay = self.config.backoff_s * 2**attempt
                logger.debug("retrying %s in %.2f s after %s", url, delay, failed.reason)
                time.sleep(delay)
        raise AssertionError("unreachable: the loop returns or raises")

    def _fetch_once(self, session: requests.Session, url: str) -> bytes:
        try:
            with session.get(url, timeout=self.config.timeout_s, stream=True) as response:
                if response.status_code != 200:
                    raise _FetchFailed(
                        f"http_{response.status_code}", response.status_code in RETRIED_STATUSES
                    )
                declared = response.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > self.config.max_bytes:
                    raise _FetchFailed("too_large", retryable=False)
                body = bytearray()
                for chunk in response.iter_content(READ_CHUNK_BYTES):
                    body += chunk
                    if len(body) > self.config.max_bytes:
                        raise _FetchFailed("too_large", retryable=False)
                return bytes(body)
        except requests.Timeout:
            raise _FetchFailed("timeout", retryable=True) from None
        except requests.exceptions.ChunkedEncodingError:
            # The server closed the connection before sending the whole declared body.
            raise _FetchFailed("truncated_body", retryable=True) from None
        except (requests.ConnectionError, requests.exceptions.ContentDecodingError):
            raise _FetchFailed("connection_error", retryable=True) from None
        except (
            requests.exceptions.InvalidURL,
            requests.exceptions.MissingSchema,
            requests.exceptions.InvalidSchema,
        ):
            raise _FetchFailed("invalid_url", retryable=False) from None
