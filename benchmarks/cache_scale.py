"""Corpus-sized cache benchmark: how planning, resume, status, the epoch plan and the evaluation's reads grow.

    python -m infra.local.netns .venv/bin/python benchmarks/cache_scale.py [--shards 500 1500 5000]

Writes a synthetic latent cache per size to S3 (the configured endpoint, or a private SeaweedFS on
loopback) through the project's own writer and manifest code, the way the encode job does: the plan
of every unit first, then each unit's fragments as shards (`UnitShardWriter`, one shard per fragment,
units spread over several aspect buckets) and its progress record. Samples are tiny (3x2x2 pixel
latents, 3 text tokens) so that the cache's size is in its shards, samples and records, not its bytes.

Half-way (progress for half of the planned units) it measures what a resumed encode job does before
encoding (`run_encode`'s lease, `plan_units`, plan) and `hybriddit status`; once every unit is written,
the encode job's publish (`publish_manifest`), the train job's epoch plan on every rank, a resume at 90%
of an epoch up to its first batch, and the evaluation's reference reads. Each measurement runs in its
own process, so its peak memory (resident high-water mark above the process's baseline after imports)
is its own. Prints seconds and peak MiB per operation and size, and the growth exponent between sizes:
log(t2/t1) / log(n2/n1), 1 = linear in shards, 2 = quadratic.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from benchmarks.train_input import s3_bucket  # noqa: E402
from services import storage  # noqa: E402
from services.cache import manifest  # noqa: E402
from services.cache.schema import CacheSample  # noqa: E402
from services.cache.writer import UnitShardWriter, write_null_text  # noqa: E402

BUCKETS = [(2, 2), (2, 3), (3, 2), (4, 4)]  # latent (h, w) of the aspect buckets
CHANNELS = 3  # the pixel codec at factor 1: latents are the image itself
TEXT_DIM = 16
TEXT_TOKENS = 3
PIXEL_CODEC = {"name": "pixel", "tiny": False, "factor": 1}  # the codec registry's describe() of that codec
HALF_OPERATIONS = ["encode_plan", "status"]
FULL_OPERATIONS = ["publish", "epoch_plan", "resume_90", "eval_reads"]


def unit_name(index: int) -> str:
    return f"part-{index:06d}"


def write_unit(out_uri: str, index: int, *, shards_per_unit: int, samples_per_shard: int) -> None:
    """One unit as the encode job writes it: a shard per fragment of `samples_per_shard`, then its progress."""
    from pipelines.actors import fragment_stem

    unit = unit_name(index)
    height, width = BUCKETS[index % len(BUCKETS)]  # one bucket per unit, every bucket in the cache
    rng = np.random.default_rng(index)
    latent = rng.standard_normal((CHANNELS, height, width)).astype(np.float32)
    text = rng.standard_normal((TEXT_TOKENS, TEXT_DIM)).astype(np.float32)
    shards: list[manifest.ShardInfo] = []
    for fragment in range(shards_per_unit):
        first = fragment * samples_per_shard
        with UnitShardWriter(out_uri, fragment_stem(unit, first), latent_dtype="fp16", text_dtype="fp16",
                             max_samples_per_shard=samples_per_shard) as writer:
            for i in range(first, first + samples_per_shard):
                writer.write(CacheSample(f"{unit}_{i:06d}", latent, text, f"sample {i} of {unit}",
                                         {"source_id": f"{unit}/{i}"}))
        shards.extend(writer.close())
    manifest.write_progress(out_uri, manifest.UnitProgress(
        unit=unit, input_uri=f"s3://corpus/{unit}.tar", shards=shards,
        samples_written=shards_per_unit * samples_per_shard, failures={"decode_error": index % 3}, seconds=1.0))


def write_chunk(out_uri: str, indices: list[int], shards_per_unit: int, samples_per_shard: int, threads: int) -> None:
    """Write some units side by side in threads (the S3 puts overlap)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda index: write_unit(out_uri, index, shards_per_unit=shards_per_unit,
                                               samples_per_shard=samples_per_shard), indices))


def write_units(pool: ProcessPoolExecutor | None, processes: int, out_uri: str, indices: range, *,
                shards_per_unit: int, samples_per_shard: int, threads: int) -> float:
    """Write the units split over `processes` processes (encoding the tars is CPU work), or in this process
    without a pool; returns the seconds it took."""
    started = time.perf_counter()
    if pool is None:
        write_chunk(out_uri, list(indices), shards_per_unit, samples_per_shard, threads)
        return time.perf_counter() - started
    chunks = [list(indices[i::processes]) for i in range(processes)]
    futures = [pool.submit(write_chunk, out_uri, chunk, shards_per_unit, samples_per_shard, threads)
               for chunk in chunks if chunk]
    for future in futures:
        future.result()
    return time.perf_counter() - started


# --------------------------------------------------------------------------- the measured operations


def _encode_job(out_uri: str) -> tuple[Any, Any, list]:
    """The encode job's config, encoder card and selected units for the synthetic cache."""
    from pipelines.actors import EncoderCard
    from pipelines.config import EncodeJobConfig
    from pipelines.sources.base import InputUnit

    job = EncodeJobConfig.model_validate({
        "source": {"kind": "folder", "root": "s3://corpus"}, "output": {"uri": out_uri},
        "codec": {"name": "pixel", "options": {"factor": 1}}, "text": {"name": "synthetic"}, "progress_bar": False})
    card = EncoderCard(codec=PIXEL_CODEC, latent_channels=CHANNELS, latent_downscale=1,
                       latent_scale=2.0, latent_shift=0.5, text_encoder={"name": "synthetic", "dim": TEXT_DIM},
                       text_dim=TEXT_DIM, text_max_len=TEXT_TOKENS, null_text=np.zeros((1, TEXT_DIM), np.float32))
    units = [InputUnit(unit_name(i), "folder", f"s3://corpus/{unit_name(i)}.tar") for i in range(job_units(out_uri))]
    return job, card, units


def job_units(out_uri: str) -> int:
    plan = manifest.read_plan(out_uri)
    assert plan is not None, f"{out_uri} has no plan"
    return len(plan.units)


def encode_plan(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    """What `run_encode` does before encoding: check the cache, take the lease, plan (clearing stale shards)."""
    from pipelines.job import check_cache_matches, partition_units, plan_units
    from pipelines.lease import WriterLease
    from services.cache.manifest import ProgressRecords, write_plan

    job, card, selection = _encode_job(out_uri)
    units = partition_units(job, selection)
    check_cache_matches(job, card)
    with WriterLease(job.output.uri, job.partition, job.lease):
        to_run, done = plan_units(job, units, ProgressRecords(job.output.uri))
        write_null_text(job.output.uri, card.null_text)
        write_plan(job.output.uri, [unit.name for unit in selection])
    return {"to_run": len(to_run), "done": len(done)}


def status(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    from services.cache.status import summarize

    summary = summarize(out_uri)
    return {"units_done": summary["units_done"], "shards": summary["shards"]}


def publish(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    from pipelines.job import publish_manifest
    from services.cache.manifest import ProgressRecords

    job, card, _ = _encode_job(out_uri)
    card_written = publish_manifest(job, card, ProgressRecords(out_uri))
    return {"shards": len(card_written.shards), "samples": card_written.num_samples}


def epoch_plan(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    """The train job's shard index (once, on the driver), its step count, and every rank's epoch plan."""
    from trainer import data

    shards = data.index_shards([out_uri])
    steps = data.steps_per_epoch(shards, world_size=options.world_size, batch_per_rank=options.batch_per_rank,
                                 seed=0, window_shards=options.window_shards)
    rank_seconds = []
    for rank in range(options.world_size):
        started = time.perf_counter()
        plan = data.epoch_plan(shards, seed=0, epoch=0, rank=rank, world_size=options.world_size,
                               batch_per_rank=options.batch_per_rank, window_shards=options.window_shards)
        rank_seconds.append(time.perf_counter() - started)
        assert len(plan) == steps, f"rank {rank} plans {len(plan)} steps, rank 0 {steps}"
    return {"steps": steps, "seconds_per_rank": max(rank_seconds)}


def resume_90(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    """Rank 0 of a train job resumed at 90% of epoch 0: index, plan, skip, and its first batch read from S3."""
    from services.cache import layout
    from services.cache.reader import load_null_text
    from trainer import data

    shards = data.index_shards([out_uri])
    steps = data.steps_per_epoch(shards, world_size=options.world_size, batch_per_rank=options.batch_per_rank,
                                 seed=0, window_shards=options.window_shards)
    start = data.DataPosition(0, int(0.9 * steps), options.world_size, options.batch_per_rank)
    stream = data.TrainingStream(shards, seed=0, rank=0, world_size=options.world_size,
                                 batch_per_rank=options.batch_per_rank, window_shards=options.window_shards,
                                 placeholder_text=load_null_text(layout.null_text_uri(out_uri)), start=start)
    batch = next(iter(stream))
    assert batch["weights"].sum() == options.batch_per_rank, "the resumed batch holds placeholders"
    return {"start_batch": start.batches, "position": stream.position.batches}


def eval_reads(out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    from trainer.evaluate import read_reference

    images, captions = read_reference(out_uri, options.eval_samples)
    return {"images": len(captions), "image_shape": list(images.shape[1:])}


OPERATIONS: dict[str, Callable[[str, argparse.Namespace], dict[str, Any]]] = {
    "encode_plan": encode_plan, "status": status, "publish": publish, "epoch_plan": epoch_plan,
    "resume_90": resume_90, "eval_reads": eval_reads,
}


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024  # kB


def measure(operation: str, out_uri: str, options: argparse.Namespace) -> dict[str, Any]:
    """Run one operation in this process: seconds, and its resident peak above the resident size at its start."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets the process's peak resident size (VmHWM) to its current size
    baseline = _status_mib("VmRSS")
    cpu_started, started = time.process_time(), time.perf_counter()
    detail = OPERATIONS[operation](out_uri, options)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {"operation": operation, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_mib": _status_mib("VmHWM") - baseline, "detail": detail}


def measure_in_subprocess(operations: list[str], out_uri: str, options: argparse.Namespace) -> list[dict[str, Any]]:
    """The operations one after another in a fresh process (not the one that wrote the cache)."""
    command = [sys.executable, __file__, "--measure", *operations, "--cache", out_uri,
               "--world-size", str(options.world_size), "--batch-per-rank", str(options.batch_per_rank),
               "--window-shards", str(options.window_shards), "--eval-samples", str(options.eval_samples)]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO_ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{operations} on {out_uri} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the report


def growth(rows: list[dict[str, Any]], field: str) -> list[str]:
    """Growth exponents between consecutive sizes: log(v2/v1) / log(n2/n1)."""
    exponents = []
    for small, large in zip(rows, rows[1:], strict=False):
        if small[field] <= 0 or large[field] <= 0:
            exponents.append("-")
            continue
        exponents.append(f"{math.log(large[field] / small[field]) / math.log(large['shards'] / small['shards']):.2f}")
    return exponents


def print_table(results: dict[str, list[dict[str, Any]]]) -> None:
    sizes = next(iter(results.values()))
    header = " | ".join(f"{row['shards']:,} shards / {row['samples']:,} samples" for row in sizes)
    print(f"\noperation    | {header} | growth exponent (wall; CPU; memory)")
    for operation, rows in results.items():
        cells = " | ".join(f"{row['seconds']:.2f} s ({row['cpu_seconds']:.2f} CPU), {row['peak_mib']:.1f} MiB"
                           for row in rows)
        exponents = "; ".join(", ".join(growth(rows, field)) for field in ("seconds", "cpu_seconds", "peak_mib"))
        print(f"{operation:<12} | {cells} | {exponents}")


def record(results: dict[str, list[dict[str, Any]]], size: dict[str, int], rows: list[dict[str, Any]]) -> None:
    for row in rows:
        results[row["operation"]].append({**size, **row})
        print(f"  {row['operation']}: {row['seconds']:.2f} s ({row['cpu_seconds']:.2f} s CPU), peak "
              f"{row['peak_mib']:.1f} MiB, {row['detail']}", flush=True)


def writers(processes: int) -> contextlib.AbstractContextManager[ProcessPoolExecutor | None]:
    """A pool of `processes` spawned writer processes, or none for one (the writing then runs in this one)."""
    if processes == 1:
        return contextlib.nullcontext()
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))


def run_sizes(prefix: str, pool: ProcessPoolExecutor | None, options: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    results: dict[str, list[dict[str, Any]]] = {operation: [] for operation in HALF_OPERATIONS + FULL_OPERATIONS}
    for shards in options.shards:
        units = max(2, shards // options.shards_per_unit)
        cache = storage.join(prefix, f"cache-{shards}")
        size = {"shards": units * options.shards_per_unit,
                "samples": units * options.shards_per_unit * options.samples_per_shard}
        manifest.write_plan(cache, [unit_name(i) for i in range(units)])
        write_null_text(cache, np.zeros((1, TEXT_DIM), np.float32))
        kwargs = {"shards_per_unit": options.shards_per_unit, "samples_per_shard": options.samples_per_shard,
                  "threads": options.threads}
        seconds = write_units(pool, options.processes, cache, range(units // 2), **kwargs)
        print(f"{size['shards']:,} shards: wrote {units // 2:,} of {units:,} units in {seconds:.1f} s", flush=True)
        record(results, size, measure_in_subprocess(HALF_OPERATIONS, cache, options))
        seconds = write_units(pool, options.processes, cache, range(units // 2, units), **kwargs)
        print(f"{size['shards']:,} shards: wrote the other {units - units // 2:,} units in {seconds:.1f} s", flush=True)
        record(results, size, measure_in_subprocess(FULL_OPERATIONS, cache, options))
        if not options.keep:
            storage.delete(cache, recursive=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[500, 1500, 5000], help="cache sizes, in shards")
    parser.add_argument("--samples-per-shard", type=int, default=20)
    parser.add_argument("--shards-per-unit", type=int, default=2, help="fragments (shards) per input unit")
    parser.add_argument("--world-size", type=int, default=8, help="ranks of the train job's epoch plan")
    parser.add_argument("--batch-per-rank", type=int, default=32)
    parser.add_argument("--window-shards", type=int, default=4, help="data.shuffle_window_shards")
    parser.add_argument("--eval-samples", type=int,
                        help="the evaluation's num_samples (default: one unit's samples, all of one bucket)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1, help="processes writing the cache")
    parser.add_argument("--threads", type=int, default=8, help="threads per writing process (overlapping puts)")
    parser.add_argument("--keep", action="store_true", help="leave the caches in the bucket")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--measure", nargs="+", choices=sorted(OPERATIONS), help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.eval_samples = options.eval_samples or options.shards_per_unit * options.samples_per_shard

    if options.measure:  # measurements in a process of their own
        # Imported and used first, so that no operation's time or peak includes the imports or the S3 client's
        # first use (botocore loading its service model).
        import pipelines.job  # noqa: F401
        import pipelines.lease  # noqa: F401
        import services.cache.status  # noqa: F401
        import services.encoders  # noqa: F401
        import trainer.data  # noqa: F401
        import trainer.evaluate  # noqa: F401

        storage.exists(options.cache)
        print(json.dumps([measure(operation, options.cache, options) for operation in options.measure]))
        return 0
    with tempfile.TemporaryDirectory(prefix="hybriddit-bench-") as scratch, \
            s3_bucket(Path(scratch), "cache-scale") as prefix, \
            writers(options.processes) as pool:
        print(f"{options.samples_per_shard} samples per shard, {options.shards_per_unit} shards per unit, "
              f"{len(BUCKETS)} buckets; train plan: {options.world_size} ranks x {options.batch_per_rank}, "
              f"shuffle windows of {options.window_shards} shards; on {prefix}", flush=True)
        results = run_sizes(prefix, pool, options)
    print_table(results)
    if options.out:
        options.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
