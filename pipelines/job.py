"""The encode job's driver, without Ray: pick and plan units, account for every sample, publish the cache.

`run_encode(job, card, execute)` is shared by the Ray graph and the single-process loop; `execute`
turns the units still to do into the writer's account rows (see `pipelines.actors.ACCOUNT_SCHEMA`).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from tqdm import tqdm

from pipelines.actors import EncoderCard
from pipelines.config import EncodeJobConfig
from pipelines.lease import WriterLease
from pipelines.ledger import UnitLedger
from pipelines.sources import build_source, select_units
from pipelines.sources.base import InputUnit
from services import storage
from services.cache import layout
from services.cache.manifest import (
    CacheManifest,
    ProgressRecords,
    UnitProgress,
    build_manifest,
    read_manifest,
    write_manifest,
    write_plan,
    write_progress,
)
from services.cache.names import safe_stem
from services.cache.writer import write_null_text

logger = logging.getLogger(__name__)

# `shards/<bucket>/<unit stem>-<first sample index:06d>-<NNNN>.tar`, see actors.fragment_stem.
FRAGMENT_SHARD = re.compile(r"^(?P<stem>.+)-\d{6}-\d{4}\.tar$")

Execute = Callable[[list[InputUnit], EncoderCard], Iterable[dict[str, Any]]]


class JobSummary(BaseModel):
    """What one run did: units, samples written and dropped by reason, throughput, cache size."""

    cache_uri: str
    units_selected: int
    units_already_done: int
    units_finished: int
    units_failed: dict[str, str]
    samples_written: int
    failures: dict[str, int]
    bytes_written: int
    seconds: float
    images_per_second: float  # from the first unit scheduled to the last written
    # The time until the first sample is written (on Ray: workers started, encoders loaded), and the rate through
    # the middle half of the run: what a corpus of millions of images sees, where the startup is paid once.
    startup_seconds: float
    steady_images_per_second: float
    cache_samples: int
    cache_bytes_per_sample: float


def steady_rate(written_at: list[tuple[float, int]], overall: float) -> float:
    """Samples per second between the moments the written count passed a quarter and three quarters of its final
    value (`written_at`: (time, samples written by then) per account). A pipelined run has as much work in flight at
    both moments, so neither the startup nor the filling of the pipeline counts; the overall rate when the run is too
    short to tell."""
    if not written_at:
        return overall
    total = written_at[-1][1]
    start = next(point for point in written_at if point[1] >= total / 4)
    end = next(point for point in written_at if point[1] >= 3 * total / 4)
    if end[0] <= start[0] or end[1] == start[1]:
        return overall
    return (end[1] - start[1]) / (end[0] - start[0])


def selected_units(job: EncodeJobConfig) -> list[InputUnit]:
    """The source's units, filtered by `units` patterns and capped by `limit` (every partition's together)."""
    return select_units(build_source(job.source).list_units(), include=job.units, limit_units=job.limit)


def partition_units(job: EncodeJobConfig, selection: list[InputUnit]) -> list[InputUnit]:
    """This job's share of the selection (all of it without `partition`)."""
    if job.partition is None:
        return selection
    return select_units(selection, shard_index=job.partition.index, num_shards=job.partition.count)


def check_cache_matches(job: EncodeJobConfig, card: EncoderCard) -> None:
    """Refuse to add samples to a cache made with other encoders or dtypes (unless redoing with overwrite)."""
    if card.latent_downscale and job.preprocess.multiple_of % card.latent_downscale:
        raise ValueError(
            f"preprocess.multiple_of={job.preprocess.multiple_of} is not a multiple of codec {job.codec.name!r}'s "
            f"downscale factor {card.latent_downscale}: set preprocess.multiple_of to a multiple of it"
        )
    if job.overwrite or not storage.exists(layout.manifest_uri(job.output.uri)):
        return
    existing = read_manifest(job.output.uri)
    wanted = {"codec": card.codec, "text_encoder": card.text_encoder, "latent_dtype": job.output.latent_dtype,
              "text_dtype": job.text.storage_dtype}  # fmt: skip
    differing = {name: (getattr(existing, name), value) for name, value in wanted.items()
                 if getattr(existing, name) != value}  # fmt: skip
    if differing:
        shown = "; ".join(f"{name}: cache has {old}, config has {new}" for name, (old, new) in differing.items())
        raise ValueError(
            f"{job.output.uri} was encoded differently ({shown}): choose another output.uri, or pass --overwrite "
            "to redo every unit"
        )


def delete_stale_shards(out_uri: str, units: list[str]) -> int:
    """Remove shards left by unfinished earlier attempts of `units`; returns how many were deleted."""
    if not units:
        return 0  # nothing to run: no need to list every shard of the cache
    stems = {safe_stem(unit) for unit in units}
    deleted = 0
    for uri in storage.list_uris(storage.join(out_uri, layout.SHARDS_DIR), recursive=True):
        match = FRAGMENT_SHARD.match(uri.rsplit("/", 1)[-1])
        if match and match["stem"] in stems:
            storage.delete(uri)
            deleted += 1
    return deleted


def plan_units(job: EncodeJobConfig, units: list[InputUnit],
               records: ProgressRecords) -> tuple[list[InputUnit], list[UnitProgress]]:
    """(units to run, units already finished); clears what the units to run left behind before."""
    out = job.output.uri
    finished = {progress.unit: progress for progress in records.read()}
    if job.overwrite:
        for unit in units:
            # Progress first: a run killed in between sees the unit unfinished and redoes it.
            storage.delete(layout.progress_uri(out, unit.name))
        done: list[UnitProgress] = []
        to_run = list(units)
    else:
        done = [finished[unit.name] for unit in units if unit.name in finished]
        to_run = [unit for unit in units if unit.name not in finished]
    deleted = delete_stale_shards(out, [unit.name for unit in to_run])
    if deleted:
        logger.info("deleted %d shards of unfinished earlier attempts", deleted)
    return to_run, done


def _finished(progresses: list[UnitProgress]) -> set[tuple[str, datetime]]:
    return {(progress.unit, progress.finished_at) for progress in progresses}


def publish_manifest(job: EncodeJobConfig, card: EncoderCard, records: ProgressRecords) -> CacheManifest:
    """The dataset card over every finished unit in the cache (this run's, earlier ones, other partitions').

    Jobs sharing a cache may publish at the same time, and the last write wins: after writing, the
    progress records are listed again and the card rewritten until it covers all of them, so the
    last card written never misses a unit that finished before it. `records` fetches only the
    records that are new since it last read them.
    """
    progresses = records.read()
    while True:
        manifest = build_manifest(
            job.output.uri, codec=card.codec, latent_channels=card.latent_channels, latent_scale=card.latent_scale,
            latent_shift=card.latent_shift, latent_dtype=job.output.latent_dtype, text_encoder=card.text_encoder,
            text_dim=card.text_dim, text_max_len=card.text_max_len, text_dtype=job.text.storage_dtype,
            job_config=job.model_dump(mode="json"), progresses=progresses, pixels=job.output.store_pixels,
        )  # fmt: skip
        write_manifest(job.output.uri, manifest)
        latest = records.read()
        if _finished(latest) == _finished(progresses):
            return manifest
        progresses = latest


def run_encode(
    job: EncodeJobConfig,
    card: EncoderCard,
    execute: Execute,
    *,
    units: list[InputUnit] | None = None,
    on_rate: Callable[[float], None] | None = None,
) -> JobSummary:
    """Plan, run `execute` over the units still to do, record each unit as it completes, publish the manifest.

    Everything from planning (which deletes what earlier attempts left) to the manifest happens under
    the writer lease of the output (or of this partition of it): a second job on the same units
    refuses to start, and a job that loses its lease stops before publishing another unit.
    """
    started = time.monotonic()
    selection = selected_units(job) if units is None else units
    units = partition_units(job, selection)
    check_cache_matches(job, card)
    records = ProgressRecords(job.output.uri)  # read when planning and publishing, each record fetched once
    with WriterLease(job.output.uri, job.partition, job.lease) as lease:
        to_run, done = plan_units(job, units, records)
        write_null_text(job.output.uri, card.null_text)
        write_plan(job.output.uri, [unit.name for unit in selection])  # the same plan from every partition
        logger.info("%d units selected, %d already finished, %d to run", len(units), len(done), len(to_run))
        ledger = UnitLedger(to_run)
        bar = tqdm(total=len(to_run), unit="unit", desc="encode", disable=not job.progress_bar, mininterval=2.0)
        run_started = time.monotonic()
        written_at: list[tuple[float, int]] = []  # (when, samples written by then), per account that wrote some
        with bar:
            for account in execute(to_run, card) if to_run else ():
                progress = ledger.record(account)
                if progress is not None:
                    lease.check()
                    write_progress(job.output.uri, progress)
                    bar.update(1)
                if ledger.samples_written > (written_at[-1][1] if written_at else 0):
                    written_at.append((time.monotonic(), ledger.samples_written))
                rate = ledger.samples_written / max(time.monotonic() - run_started, 1e-9)
                bar.set_postfix(samples=ledger.samples_written, dropped=sum(ledger.failures.values()),
                                img_s=f"{rate:.1f}", refresh=False)  # fmt: skip
                if on_rate is not None:
                    on_rate(rate)
        failed = ledger.close()
        run_seconds = time.monotonic() - run_started
        for unit, reason in failed.items():
            logger.error("unit %s did not finish (%s); the next run redoes it", unit, reason)
        lease.check()
        manifest = publish_manifest(job, card, records)
    written = sum(progress.samples_written for progress in ledger.finished)
    overall_rate = written / max(run_seconds, 1e-9)
    failures: Counter = Counter()
    for progress in ledger.finished:
        failures.update(progress.failures)
    return JobSummary(
        cache_uri=job.output.uri,
        units_selected=len(units),
        units_already_done=len(done),
        units_finished=len(ledger.finished),
        units_failed=failed,
        samples_written=written,
        failures=dict(sorted(failures.items())),
        bytes_written=sum(shard.num_bytes for progress in ledger.finished for shard in progress.shards),
        seconds=time.monotonic() - started,
        images_per_second=overall_rate,
        startup_seconds=written_at[0][0] - run_started if written_at else run_seconds,
        steady_images_per_second=steady_rate(written_at, overall_rate),
        cache_samples=manifest.num_samples,
        cache_bytes_per_sample=manifest.num_bytes / max(manifest.num_samples, 1),
    )
