"""LAION-style metadata: parquet rows of image URL + caption, images fetched over HTTP.

One unit per (parquet file, row group). Fetches run on a thread pool but samples come out in row
order, and every failed fetch becomes a sample with a failure reason instead of an exception
(`pipelines/sources/safe_http.py`: public hosts only, bounded size, time and redirects, urllib3 retries).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import pyarrow.parquet as pq
import requests
from pydantic import Field, IPvAnyNetwork

from pipelines.preprocess import SampleRejected, clean_caption
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.listing import expand_uris, unique_unit_names
from pipelines.sources.safe_http import FetchFailed, FetchLimits, fetch, make_session
from services import storage
from services.cache.names import safe_stem
from services.config import StrictModel

logger = logging.getLogger(__name__)


class LaionConfig(StrictModel):
    """Parquet files, their column names and how patiently (and where) to fetch images."""

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
    deadline_s: float = Field(
        default=60.0, gt=0, description="total time one download may take, redirects and body included; a "
        "server that trickles bytes (each read inside timeout_s) is cut off here as too_slow",
    )
    retries: int = Field(
        default=2, ge=0, description="extra attempts after a timeout, connection error or 408/425/429/5xx"
    )
    backoff_s: float = Field(
        default=0.5, ge=0, description="urllib3 Retry backoff_factor: retry n > 1 waits backoff_s * 2**(n-1)"
    )
    max_bytes: int = Field(default=32 * 2**20, gt=0, description="larger downloads are aborted as too_large")
    max_redirects: int = Field(default=5, ge=0, description="more redirects than this: too_many_redirects")
    allowed_networks: list[IPvAnyNetwork] = Field(
        default_factory=list, description="networks fetched from although they are loopback, private, link-local "
        "or multicast (refused as blocked_<kind> otherwise), e.g. ['127.0.0.1/32'] for a test server or an "
        "internal mirror's subnet; never needed for public URLs",
    )
    concurrency: int = Field(default=16, ge=1, description="parallel fetches per unit")
    user_agent: str = "hybriddit-factory/0.1 (research image-text dataset builder)"


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
        config = self.config
        session = make_session(retries=config.retries, backoff_s=config.backoff_s, pool_size=config.concurrency,
                               user_agent=config.user_agent, allowed_networks=tuple(config.allowed_networks))
        with session, ThreadPoolExecutor(config.concurrency) as pool:
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
            image_bytes = fetch(session, url, self._limits)
        except FetchFailed as failed:
            logger.debug("%s: %s", url, failed)
            return RawSample(key, None, caption, meta, failure=failed.reason)
        return RawSample(key, image_bytes, caption, meta)

    @property
    def _limits(self) -> FetchLimits:
        config = self.config
        return FetchLimits(timeout_s=config.timeout_s, deadline_s=config.deadline_s, max_bytes=config.max_bytes,
                           max_redirects=config.max_redirects)
