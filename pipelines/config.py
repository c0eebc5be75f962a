"""The encode job's config: where samples come from, how they are prepared, encoded and stored."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from pipelines.preprocess import PreprocessConfig
from pipelines.sources import SourceConfig
from services.cache.schema import LatentDtype, TextDtype
from services.config import StrictModel

EncoderDtype = Literal["float32", "bfloat16", "float16"]


class EncoderStageConfig(StrictModel):
    """One frozen encoder run as a Ray actor pool: which model, how many actors, what each may use."""

    name: str
    tiny: bool = Field(default=False, description="seeded random tiny weights (tests), not the real model")
    options: dict[str, Any] = Field(default_factory=dict, description="the registry's options for this model")
    batch_size: int = Field(default=16, ge=1, description="samples per encoder call")
    concurrency: int = Field(default=1, ge=1, description="actors in the pool (its minimum when autoscaling)")
    max_concurrency: int | None = Field(
        default=None, ge=1, description="autoscale the pool up to this many actors while work is queued and the "
        "cluster has room (e.g. as GPU nodes join); None = a fixed pool of `concurrency`",
    )
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per actor; > 0 runs the encoder on CUDA")
    # Fractional by default: on a 2-CPU node, pools that take every CPU starve the read tasks (deadlock).
    num_cpus: float = Field(default=0.5, gt=0, description="CPUs per actor")
    dtype: EncoderDtype = Field(default="bfloat16", description="compute dtype on CUDA; CPU always runs float32")
    # Ray starts an actor with OMP_NUM_THREADS = its num_cpus (1 for a fractional share), so on a CPU-only
    # node a pool of one actor computes on one core while the others wait for its batches.
    cpu_threads: Annotated[int, Field(ge=1)] | Literal["all"] | None = Field(
        default=None, description="torch threads per actor on CPU: a number, 'all' (every core the actor's "
        "process may use) or None (Ray's share, its num_cpus rounded up)",
    )

    @model_validator(mode="after")
    def _pool_range_is_ordered(self) -> EncoderStageConfig:
        if self.max_concurrency is not None and self.max_concurrency < self.concurrency:
            raise ValueError(f"max_concurrency ({self.max_concurrency}) must be >= concurrency ({self.concurrency})")
        return self

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"

    def torch_threads(self) -> int | None:
        """The intra-op threads this stage asks for on CPU; None leaves Ray's setting alone."""
        if self.device != "cpu" or self.cpu_threads is None:
            return None
        return len(os.sched_getaffinity(0)) if self.cpu_threads == "all" else self.cpu_threads


class CodecStageConfig(EncoderStageConfig):
    """The image codec (VAE) pool."""

    name: str = "dc-ae-f32c32-sana-1.1"


class TextStageConfig(EncoderStageConfig):
    """The text encoder pool and how its hidden states are stored."""

    name: str = "t5-base"
    batch_size: int = Field(default=32, ge=1, description="prompts per encoder call")
    storage_dtype: TextDtype = Field(default="fp16", description="fp16, or int8 with per-token scales")


class ReadConfig(StrictModel):
    """The read + decode tasks: one per input unit."""

    num_cpus: float = Field(default=0.25, gt=0, description="CPUs per read task")
    bucket_window: int = Field(
        default=64, ge=1, description="prepared samples held back and emitted grouped by bucket, so encoder "
        "batches are mostly one shape",
    )


class OutputConfig(StrictModel):
    """Where the latent cache goes and how its shards are cut."""

    uri: str = Field(description="cache prefix: s3://bucket/prefix, file:// or a local path")
    latent_dtype: LatentDtype = "fp16"
    store_pixels: bool = Field(
        default=False, description="also store each sample's preprocessed image (uint8 pixels.npy) beside its latent, "
        "for pixel-space losses (Hi-DiT's pixel branch); the manifest records it",
    )
    max_samples_per_shard: int = Field(default=1000, ge=1)
    fragment_samples: int = Field(
        default=512, ge=1, description="samples per writer call; every call writes its own shard(s) per unit and "
        "bucket, so this bounds both shard size and writer memory",
    )
    writer_concurrency: int = Field(default=1, ge=1, description="writer actors")
    writer_num_cpus: float = Field(default=0.25, gt=0, description="CPUs per writer actor")


class PartitionConfig(StrictModel):
    """This job's share of the selected units, so that `count` jobs can encode one corpus into one cache."""

    index: int = Field(ge=0, description="this job's partition, 0-based")
    count: int = Field(ge=1, description="how many jobs share the units (every count-th unit from index)")

    @model_validator(mode="after")
    def _index_in_range(self) -> PartitionConfig:
        if self.index >= self.count:
            raise ValueError(f"partition.index ({self.index}) must be < partition.count ({self.count})")
        return self


class LeaseConfig(StrictModel):
    """The writer lease that keeps a second job off a cache (or a partition of it) while one writes it."""

    ttl_seconds: float = Field(
        default=300.0, gt=0, description="a lease not renewed for this long is expired: the next job takes it over "
        "(the time a crashed job blocks its cache)",
    )
    renew_every_seconds: float = Field(default=60.0, gt=0, description="how often the running job renews it")
    break_lease: bool = Field(
        default=False, description="take the lease even if another job holds it and it has not expired "
        "(`--break-lease`: only when that job is known to be dead)",
    )

    @model_validator(mode="after")
    def _renewed_before_it_expires(self) -> LeaseConfig:
        if self.renew_every_seconds * 2 > self.ttl_seconds:
            raise ValueError(f"lease.renew_every_seconds ({self.renew_every_seconds}) must be at most half of "
                             f"lease.ttl_seconds ({self.ttl_seconds}), so that one late renewal does not lose it")
        return self


class EncodeJobConfig(StrictModel):
    """`pipelines/encode_latents.py`: an image+caption corpus -> the latent cache the trainer reads."""

    source: SourceConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    read: ReadConfig = Field(default_factory=ReadConfig)
    codec: CodecStageConfig = Field(default_factory=CodecStageConfig)
    text: TextStageConfig = Field(default_factory=TextStageConfig)
    output: OutputConfig
    units: list[str] | None = Field(default=None, description="only units whose names match these glob patterns")
    limit: int | None = Field(default=None, ge=0, description="at most this many units (partial runs)")
    partition: PartitionConfig | None = Field(
        default=None, description="run only this job's share of the selected units; None = all of them",
    )
    overwrite: bool = Field(default=False, description="redo units that already finished")
    lease: LeaseConfig = Field(default_factory=LeaseConfig)
    progress_bar: bool = True

    @model_validator(mode="after")
    def _writer_can_fill_a_shard(self) -> EncodeJobConfig:
        if self.output.fragment_samples > self.output.max_samples_per_shard:
            # A writer call never sees more than fragment_samples, so larger shards could never fill.
            raise ValueError(
                f"output.fragment_samples ({self.output.fragment_samples}) must be <= "
                f"output.max_samples_per_shard ({self.output.max_samples_per_shard})"
            )
        return self
