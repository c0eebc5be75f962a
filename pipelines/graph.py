"""The encode job as a Ray Data graph: read tasks -> codec actors -> text actors -> shard writers.

Units are scheduled as read tasks across the cluster; the encoder pools overlap with decoding and
upload because Ray Data streams blocks between operators. The driver only sees the writers' small
account rows and does the bookkeeping in `pipelines.job.run_encode`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from pipelines.actors import (
    EncoderCard,
    ImageEncoderActor,
    ShardFragmentWriter,
    TextEncoderActor,
    UnitReader,
    build_encoder_card,
    unit_row,
)
from pipelines.config import EncodeJobConfig, EncoderStageConfig
from pipelines.job import JobSummary, run_encode
from pipelines.sources.base import InputUnit
from services.metrics import EncodeMetrics

RATE_REPORT_SECONDS = 5.0


def read_unit(item: dict[str, Any], job: EncodeJobConfig) -> Iterator[dict[str, Any]]:
    """flat_map body: a read task builds its source and streams one unit's rows."""
    return UnitReader(job)(item)


def actor_pool(stage: EncoderStageConfig) -> ray.data.ActorPoolStrategy:
    """A fixed pool of `concurrency` actors, or one that autoscales from `concurrency` to `max_concurrency`."""
    if stage.max_concurrency is None:
        return ray.data.ActorPoolStrategy(size=stage.concurrency)
    return ray.data.ActorPoolStrategy(min_size=stage.concurrency, max_size=stage.max_concurrency)


def build_dataset(job: EncodeJobConfig, units: list[InputUnit], card: EncoderCard) -> ray.data.Dataset:
    """The lazy graph over `units`; its rows are the writers' account rows."""
    codec, text, output = job.codec, job.text, job.output
    dataset = ray.data.from_items([unit_row(unit) for unit in units], override_num_blocks=len(units))
    dataset = dataset.flat_map(read_unit, fn_kwargs={"job": job}, num_cpus=job.read.num_cpus)
    dataset = dataset.map_batches(
        ImageEncoderActor, fn_constructor_kwargs={"stage": codec, "keep_pixels": output.store_pixels},
        batch_size=codec.batch_size,
        batch_format="pyarrow", compute=actor_pool(codec), num_cpus=codec.num_cpus, num_gpus=codec.num_gpus,
    )  # fmt: skip
    dataset = dataset.map_batches(
        TextEncoderActor, fn_constructor_kwargs={"stage": text}, batch_size=text.batch_size,
        batch_format="pyarrow", compute=actor_pool(text), num_cpus=text.num_cpus, num_gpus=text.num_gpus,
    )  # fmt: skip
    return dataset.map_batches(
        ShardFragmentWriter,
        fn_constructor_kwargs={"output": output, "text_dtype": text.storage_dtype, "encoder_ids": card.ids()},
        batch_size=output.fragment_samples, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=output.writer_concurrency),
        num_cpus=output.writer_num_cpus,
    )  # fmt: skip


def execute_on_ray(job: EncodeJobConfig) -> Callable[[list[InputUnit], EncoderCard], Iterator[dict[str, Any]]]:
    def execute(units: list[InputUnit], card: EncoderCard) -> Iterator[dict[str, Any]]:
        for batch in build_dataset(job, units, card).iter_batches(batch_format="pyarrow", batch_size=None):
            yield from batch.to_pylist()

    return execute


def remote_encoder_card(job: EncodeJobConfig) -> EncoderCard:
    """Specs and null text from encoders built where the actors run (same device and dtype)."""
    task = ray.remote(build_encoder_card).options(
        num_cpus=min(job.codec.num_cpus, job.text.num_cpus), num_gpus=max(job.codec.num_gpus, job.text.num_gpus)
    )
    return ray.get(task.remote(job))


def rate_gauge(metrics: EncodeMetrics) -> Callable[[float], None]:
    """Sets the images/s gauge at most every few seconds (each set crosses into Ray's core worker)."""
    last = [0.0]

    def report(rate: float) -> None:
        now = time.monotonic()
        if now - last[0] >= RATE_REPORT_SECONDS:
            metrics.images_per_second(rate)
            last[0] = now

    return report


def run_on_ray(job: EncodeJobConfig) -> JobSummary:
    """Run the encode job on the connected Ray cluster (call `ray.init()` first)."""
    context = ray.data.DataContext.get_current()
    # The driver prints one bar of finished units; per-operator bars would interleave with it in job logs.
    context.enable_progress_bars = False
    metrics = EncodeMetrics()
    summary = run_encode(job, remote_encoder_card(job), execute_on_ray(job), on_rate=rate_gauge(metrics))
    metrics.images_per_second(summary.images_per_second)
    return summary
