"""`hybriddit status <cache-uri> [--watch]`: progress of a latent cache from its plan and progress records."""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Literal

from services import storage
from services.cache import layout
from services.cache.manifest import UnitProgress, list_progress, read_manifest, read_plan

RECENT_SECONDS = 60.0  # the window of the live view's throughput and ETA
JobState = Literal["waiting", "running", "finished", "stopped"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache_uri", help="output prefix of the encode job (s3://..., file://... or a path)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument(
        "--watch", action="store_true", help="redraw the table every --interval seconds until the encode job ends"
    )
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="redraw period of --watch")


def summarize(out_uri: str, *, now: datetime | None = None) -> dict[str, Any]:
    """Units done/total, samples, bytes, failures by reason and throughput of a (possibly running) cache."""
    now = now or datetime.now(timezone.utc)
    progresses = list_progress(out_uri)
    plan = read_plan(out_uri)
    shards = [shard for progress in progresses for shard in progress.shards]
    samples = sum(progress.samples_written for progress in progresses)
    failures: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    for progress in progresses:
        failures.update(progress.failures)
    for shard in shards:
        buckets[shard.bucket] += shard.num_samples
    done = {progress.unit for progress in progresses}
    remaining = None if plan is None else [unit for unit in plan.units if unit not in done]
    wall_seconds = _wall_seconds(progresses)
    wall_rate = samples / wall_seconds if wall_seconds > 0 else None
    unit_seconds = sum(progress.seconds for progress in progresses)
    recent_rate = _recent_rate(progresses, now)
    eta = None
    # The last minute's pace when there is one (a resumed or slowed job), else the whole run's.
    rate_for_eta = recent_rate or wall_rate
    if remaining is not None and rate_for_eta and progresses:
        eta = len(remaining) * (samples / len(progresses)) / rate_for_eta
    manifest_exists = storage.exists(layout.manifest_uri(out_uri))
    return {
        "cache": out_uri,
        "units_done": len(progresses),
        "units_total": None if plan is None else len(plan.units),
        "units_remaining": remaining,
        "samples": samples,
        "shards": len(shards),
        "bytes": sum(shard.num_bytes for shard in shards),
        "failures": dict(sorted(failures.items())),
        "buckets": dict(sorted(buckets.items())),
        "unit_seconds": unit_seconds,
        # Per unit: how fast one worker encodes; wall: the whole job, units running side by side.
        "samples_per_second_per_unit": samples / unit_seconds if unit_seconds > 0 else None,
        "samples_per_second_wall": wall_rate,
        "samples_per_second_last_minute": recent_rate,
        "eta_seconds": eta,
        "manifest_updated_at": read_manifest(out_uri).updated_at.isoformat() if manifest_exists else None,
    }


def _wall_seconds(progresses: list[UnitProgress]) -> float:
    """From the first unit's start (finish minus its seconds) to the last unit's finish."""
    if not progresses:
        return 0.0
    start = min(progress.finished_at.timestamp() - progress.seconds for progress in progresses)
    return max(progress.finished_at.timestamp() for progress in progresses) - start


def _recent_rate(progresses: list[UnitProgress], now: datetime) -> float | None:
    """Samples per second of the units that finished in the last minute (None when none did)."""
    since = now.timestamp() - RECENT_SECONDS
    recent = [progress for progress in progresses if progress.finished_at.timestamp() > since]
    if not recent:
        return None
    # A run younger than the window is measured from its first unit's start, not over a full minute.
    started = min(progress.finished_at.timestamp() - progress.seconds for progress in progresses)
    return sum(progress.samples_written for progress in recent) / max(now.timestamp() - max(since, started), 1e-9)


def job_state(out_uri: str, *, now: float | None = None) -> JobState:
    """Whether an encode job is writing the cache now, has published its manifest, or stopped before that.

    A job holds a writer lease (`_lease*.json`, renewed until it ends) from its plan to its manifest;
    the plan is rewritten at every start, so a manifest older than the plan belongs to an earlier run.
    """
    now = time.time() if now is None else now
    for uri in storage.list_uris(out_uri):
        if not layout.LEASE_FILE.match(uri.rsplit("/", 1)[-1]):
            continue
        try:
            if storage.read_json(uri)["expires_at"] > now:
                return "running"
        except storage.StorageNotFoundError:
            continue  # released between the listing and the read
    plan = read_plan(out_uri)
    if storage.exists(layout.manifest_uri(out_uri)):
        if plan is None or read_manifest(out_uri).updated_at >= plan.created_at:
            return "finished"
    return "waiting" if plan is None else "stopped"


def _table(summary: dict[str, Any], state: JobState | None = None):
    from rich.table import Table

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f} samples/s"

    total = summary["units_total"]
    table = Table(title=f"latent cache {summary['cache']}", show_header=False)
    if state is not None:
        table.add_row("encode job", state)
    table.add_row("units", f"{summary['units_done']} / {'?' if total is None else total}")
    table.add_row("samples", f"{summary['samples']:,}")
    table.add_row("shards", f"{summary['shards']:,} ({summary['bytes'] / 2**20:,.1f} MiB)")
    for bucket, count in summary["buckets"].items():
        table.add_row(f"  bucket {bucket}", f"{count:,}")
    table.add_row(
        "failures", ", ".join(f"{reason}: {n:,}" for reason, n in summary["failures"].items()) or "none"
    )
    table.add_row("throughput (wall)", rate(summary["samples_per_second_wall"]))
    table.add_row("throughput (per unit)", rate(summary["samples_per_second_per_unit"]))
    table.add_row("throughput (last minute)", rate(summary["samples_per_second_last_minute"]))
    eta = summary["eta_seconds"]
    table.add_row("eta", "-" if eta is None else f"{eta / 60:,.1f} min")
    table.add_row("manifest", summary["manifest_updated_at"] or "not written yet")
    return table


def watch(out_uri: str, *, interval: float = 1.0, console=None) -> JobState:
    """Redraw the cache's table every `interval` s until its encode job has finished or stopped."""
    from rich.live import Live

    with Live(console=console, auto_refresh=False) as live:
        while True:
            # The state first: a job that publishes its manifest between the two reads is drawn complete.
            state = job_state(out_uri)
            live.update(_table(summarize(out_uri), state), refresh=True)
            if state in ("finished", "stopped"):
                return state
            time.sleep(interval)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.watch:
        state = watch(args.cache_uri, interval=args.interval)
        if state == "stopped":
            print(f"{args.cache_uri}: the encode job stopped before publishing its manifest; submit it again to "
                  "resume the units that remain")  # fmt: skip
            return 1
        return 0
    summary = summarize(args.cache_uri)
    if (
        summary["units_done"] == 0
        and summary["units_total"] is None
        and summary["manifest_updated_at"] is None
    ):
        print(
            f"{args.cache_uri}: no _plan.json, _progress/ or manifest.json there;"
            " is this an encode job's output?"
        )
        return 1
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        Console().print(_table(summary))
    return 0
