"""The jobs' Ray metrics in one place: names, tags and one small recorder class per job.

Ray exports every custom metric on its metrics endpoint with a `ray_` prefix, which is the name
Prometheus stores and the Grafana dashboards in `infra/grafana/dashboards/` query.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

RAY_EXPORT_PREFIX = "ray_"

MetricKind = Literal["counter", "gauge", "histogram"]

ENCODE_STAGES = ("read", "decode", "vae", "text", "write")

# Per-batch stage times run from milliseconds (decode of a thumbnail) to minutes (a DC-AE
# encode of a large batch on CPU, a multi-GB shard upload).
STAGE_SECONDS_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric: the name the job records and the series Prometheus stores."""

    name: str
    kind: MetricKind
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        return RAY_EXPORT_PREFIX + self.name

    @property
    def exported_series(self) -> tuple[str, ...]:
        """Series names on the Prometheus endpoint (a histogram becomes bucket, sum and count)."""
        if self.kind == "histogram":
            return tuple(f"{self.exported_name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        return (self.exported_name,)

    def build(self):
        """The live `ray.util.metrics` object; it registers with the connected Ray process."""
        from ray.util import metrics

        if self.kind == "counter":
            return metrics.Counter(self.name, self.description, self.tag_keys)
        if self.kind == "gauge":
            return metrics.Gauge(self.name, self.description, self.tag_keys)
        return metrics.Histogram(self.name, self.description, list(self.boundaries), self.tag_keys)


ENCODE_METRICS = (
    MetricSpec("hybriddit_encode_images_total", "counter", "Images encoded into the latent cache."),
    MetricSpec("hybriddit_encode_bytes_written_total", "counter", "Bytes of cache shards uploaded."),
    MetricSpec("hybriddit_encode_shards_written_total", "counter", "Cache shards uploaded."),
    MetricSpec(
        "hybriddit_encode_failures_total", "counter", "Samples dropped by the encode job.", ("reason",)
    ),
    MetricSpec(
        "hybriddit_encode_stage_seconds",
        "histogram",
        "Seconds one batch spends in a pipeline stage.",
        ("stage",),
        STAGE_SECONDS_BOUNDARIES,
    ),
    MetricSpec("hybriddit_encode_images_per_second", "gauge", "Encode throughput seen by this process."),
)

TRAIN_METRICS = (
    MetricSpec("hybriddit_train_loss", "gauge", "Flow-matching MSE of the last step.", ("rank",)),
    MetricSpec("hybriddit_train_grad_norm", "gauge", "Global gradient norm before clipping."),
    MetricSpec("hybriddit_train_lr", "gauge", "Learning rate of the last step."),
    MetricSpec("hybriddit_train_steps_per_second", "gauge", "Optimizer steps per second.", ("rank",)),
    MetricSpec("hybriddit_train_samples_per_second", "gauge", "Training samples per second.", ("rank",)),
    MetricSpec(
        "hybriddit_train_data_wait_fraction",
        "gauge",
        "Fraction of step time spent waiting for the next batch.",
        ("rank",),
    ),
    MetricSpec("hybriddit_train_checkpoint_seconds", "gauge", "Seconds the last checkpoint took to save."),
    MetricSpec("hybriddit_train_step", "gauge", "Optimizer step reached.", ("rank",)),
    MetricSpec(
        "hybriddit_train_samples_skipped_total", "counter", "Cache samples the loader skipped.", ("reason",)
    ),
)

METRICS: Mapping[str, MetricSpec] = {spec.name: spec for spec in ENCODE_METRICS + TRAIN_METRICS}

METRIC_NAMES: tuple[str, ...] = tuple(METRICS)

EXPORTED_SERIES: frozenset[str] = frozenset(
    series for spec in METRICS.values() for series in spec.exported_series
)


def _require_connected_ray() -> None:
    import ray

    # Ray silently drops metrics recorded in a process that never joined a cluster.
    if not ray.is_initialized():
        raise RuntimeError(
            "job metrics need a connected Ray driver or worker: call ray.init() (or run inside a Ray "
            "task, actor or job) before creating them"
        )


def _build(specs: tuple[MetricSpec, ...]) -> dict[str, object]:
    _require_connected_ray()
    return {spec.name: spec.build() for spec in specs}


def _increment(metrics: dict[str, object], name: str, value: int | float, tags: dict[str, str] | None = None):
    if value < 0:
        raise ValueError(f"{name}: a counter only grows, got increment {value}")
    # Ray's counters reject a zero increment; a batch that wrote nothing adds nothing.
    if value:
        metrics[name].inc(value, tags=tags)


class EncodeMetrics:
    """Throughput, failures and per-stage time of the latent-cache encode job.

    Per-stage queues are Ray Data's own `ray_data_operator_queued_blocks` (one series per operator).
    """

    def __init__(self) -> None:
        self._metrics = _build(ENCODE_METRICS)

    def images_encoded(self, count: int) -> None:
        _increment(self._metrics, "hybriddit_encode_images_total", count)

    def bytes_written(self, count: int) -> None:
        _increment(self._metrics, "hybriddit_encode_bytes_written_total", count)

    def shards_written(self, count: int = 1) -> None:
        _increment(self._metrics, "hybriddit_encode_shards_written_total", count)

    def failures(self, reason: str, count: int = 1) -> None:
        _increment(self._metrics, "hybriddit_encode_failures_total", count, {"reason": reason})

    def stage_seconds(self, stage: str, seconds: float) -> None:
        self._metrics["hybriddit_encode_stage_seconds"].observe(seconds, tags={"stage": _known_stage(stage)})

    def images_per_second(self, rate: float) -> None:
        self._metrics["hybriddit_encode_images_per_second"].set(rate)


def _known_stage(stage: str) -> str:
    if stage not in ENCODE_STAGES:
        raise ValueError(f"encode stage {stage!r} is not one of {', '.join(ENCODE_STAGES)}")
    return stage


class TrainMetrics:
    """Loss, optimizer state, throughput and input stalls of one training worker (DDP rank)."""

    def __init__(self, rank: int) -> None:
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self._rank = {"rank": str(rank)}
        self._metrics = _build(TRAIN_METRICS)

    def step(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        lr: float,
        steps_per_second: float,
        samples_per_second: float,
        data_wait_fraction: float,
    ) -> None:
        """Record one optimizer step (call every N steps: each call crosses into Ray's core worker)."""
        if not 0.0 <= data_wait_fraction <= 1.0:
            raise ValueError(f"data_wait_fraction must lie in [0, 1], got {data_wait_fraction}")
        per_rank = {
            "hybriddit_train_step": step,
            "hybriddit_train_loss": loss,
            "hybriddit_train_steps_per_second": steps_per_second,
            "hybriddit_train_samples_per_second": samples_per_second,
            "hybriddit_train_data_wait_fraction": data_wait_fraction,
        }
        for name, value in per_rank.items():
            self._metrics[name].set(value, tags=self._rank)
        self._metrics["hybriddit_train_grad_norm"].set(grad_norm)
        self._metrics["hybriddit_train_lr"].set(lr)

    def checkpoint_seconds(self, seconds: float) -> None:
        self._metrics["hybriddit_train_checkpoint_seconds"].set(seconds)

    def samples_skipped(self, reason: str, count: int = 1) -> None:
        _increment(self._metrics, "hybriddit_train_samples_skipped_total", count, {"reason": reason})
