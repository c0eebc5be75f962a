"""`hybriddit status <cache-uri>`: progress of a latent cache from its plan and progress records."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

from services import storage
from services.cache import layout
from services.cache.manifest import UnitProgress, list_progress, read_manifest, read_plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cache_uri", help="output prefix of the encode job (s3://..., file://... or a path)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def summarize(out_uri: str) -> dict[str, Any]:
    """Units done/total, samples, bytes, failures by reason and throughput of a (possibly running) cache."""
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
    eta = None
    if remaining is not None and wall_rate and progresses:
        eta = len(remaining) * (samples / len(progresses)) / wall_rate
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
        "eta_seconds": eta,
        "manifest_updated_at": read_manifest(out_uri).updated_at.isoformat() if manifest_exists else None,
    }


def _wall_seconds(progresses: list[UnitProgress]) -> float:
    """From the first unit's start (finish minus its seconds) to the last unit's finish."""
    if not progresses:
        return 0.0
    start = min(progress.finished_at.timestamp() - progress.seconds for progress in progresses)
    return max(progress.finished_at.timestamp() for progress in progresses) - start


def _print_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:,.1f} samples/s"

    total = summary["units_total"]
    table = Table(title=f"latent cache {summary['cache']}", show_header=False)
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
    eta = summary["eta_seconds"]
    table.add_row("eta", "-" if eta is None else f"{eta / 60:,.1f} min")
    table.add_row("manifest", summary["manifest_updated_at"] or "not written yet")
    Console().print(table)


def run(args: argparse.Namespace) -> int:
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
        _print_table(summary)
    return 0
