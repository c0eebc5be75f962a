"""The train job's config: every knob of a run, validated at start-up (`configs/train/*.yaml`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from services.config import StrictModel
from trainer.flow_matching import TimestepSampling
from trainer.samplers import SamplerSettings

Precision = Literal["fp32", "bf16", "fp8"]


class DataConfig(StrictModel):
    """Where the latent cache lives and how each rank streams it."""

    uris: list[str] = Field(
        min_length=1,
        description="cache roots holding manifest.json, or shard .tar URIs of a cache without one (reference layout)",
    )
    null_text_uri: str | None = Field(None, description="(L, D) .npy for CFG dropout; default: <first cache>/null_text.npy")
    buckets: list[str] | None = Field(None, description="aspect buckets '{h}x{w}' to train on; None = all")
    shuffle_window_shards: int = Field(4, ge=1, description="shards whose samples are shuffled together")
    prefetch_shards: int = Field(2, ge=0, description="shards read ahead in background threads")
    loader_process: bool = Field(
        True, description="read, decode and collate batches in a separate (spawned) process; false = in the "
        "training process, in threads")
    prefetch_batches: int = Field(4, ge=1, description="collated batches the loader process keeps ready")
    fail_on_corrupt: bool = Field(False, description="raise on an unreadable shard/sample instead of skipping it")
    batch_timeout_s: float = Field(
        300.0, gt=0, description="longest wait for one batch's shards (and for the loader process's next batch); "
        "past it the step fails loudly instead of one stuck read hanging the whole DDP group")


class ModelSection(StrictModel):
    """A preset from trainer.models.MODEL_PRESETS plus field overrides."""

    preset: str = "HybridDiT-148M"
    overrides: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(StrictModel):
    """AdamW with linear warmup then cosine decay, and global-norm gradient clipping."""

    lr: float = Field(4e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0, description="max global grad norm; None = no clipping")
    warmup_fraction: float = Field(0.05, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine floor as a fraction of lr")


class EMAConfig(StrictModel):
    decay: float = Field(0.9999, ge=0, lt=1)


class CheckpointConfig(StrictModel):
    """Where checkpoints go (`<uri>/step_NNNNNNN/`) and how often."""

    uri: str
    every_steps: int = Field(1000, ge=1)
    keep_last: int = Field(3, ge=1)
    resume: bool = Field(True, description="continue from the newest checkpoint under <uri> whose files verify")
    resume_from: str | None = Field(
        None, description="while <uri> holds no checkpoint, continue from another run's checkpoint root (its "
        "newest verified checkpoint: weights, AdamW and schedule, RNG, data position), global step included, as Hi-DiT's stage 2 continues stage 1: set "
        "max_steps to the total over both runs")


class ValidationConfig(StrictModel):
    """Held-out loss at a fixed grid of t: from separate caches, or the last shards of the training cache."""

    uris: list[str] = Field(default_factory=list)
    holdout_shards: int = Field(0, ge=0, description="last N shards of the training cache kept out of training")
    t_grid: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    every_steps: int = Field(1000, ge=1)
    max_batches: int = Field(8, ge=1)

    @property
    def enabled(self) -> bool:
        return bool(self.uris) or self.holdout_shards > 0

    @model_validator(mode="after")
    def _check_grid(self) -> ValidationConfig:
        bad = [t for t in self.t_grid if not 0 <= t <= 1]
        if bad:
            raise ValueError(f"t_grid values {bad} are outside [0, 1]")
        return self


class SamplesConfig(SamplerSettings):
    """A grid of images from fixed prompts every N steps, uploaded next to the checkpoints."""

    prompts: list[str] = Field(default_factory=list)
    every_steps: int = Field(1000, ge=1)

    @property
    def enabled(self) -> bool:
        return bool(self.prompts)


class PixelBranchConfig(StrictModel):
    """Hi-DiT stage 2: the pixel stream trained beside the latent flow on the cache's pixels."""

    weight: float = Field(1.0, ge=0, description="weight of the pixel-space flow-matching loss of the sub-pixel "
                          "head (on the samples whose t is below the model's pixel_gate_t)")


class RepaConfig(StrictModel):
    """REPA: align the model's projected image tokens (after its `repa_depth` blocks) with a frozen image encoder's
    patch features of the clean image; needs a cache with pixels."""

    encoder: str = Field("facebook/dinov2-small", description="a name in trainer.representation.FEATURE_ENCODERS "
                         "(its weights downloaded beforehand) or a local directory holding a DINOv2 model")
    weight: float = Field(0.5, ge=0, description="weight of the negative cosine similarity (the seed's proj-coeff)")


class WorkerScaling(StrictModel):
    """Ray Train workers: one DDP rank each."""

    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(0, ge=0, description="worker-group restarts; each resumes from the latest checkpoint")


class TrainJobConfig(StrictModel):
    """One training run."""

    run_name: str = "hybriddit"
    data: DataConfig
    model: ModelSection = ModelSection()
    batch_size: int = Field(256, ge=1, description="global batch, split evenly over the workers")
    optimizer: OptimizerConfig = OptimizerConfig()
    precision: Precision = "fp32"
    allow_fp8_fallback: bool = Field(False, description="without a GPU that supports FP8, log and use bf16/fp32")
    compile: bool = False
    activation_checkpointing: bool = False
    ema: EMAConfig = EMAConfig()
    cfg_dropout: float = Field(0.1, ge=0, le=1)
    timesteps: TimestepSampling = TimestepSampling()
    teacher: str | None = Field(
        None, description="LiT-style distillation: the export of a teacher (an export dir, a step dir or a "
        "checkpoint root, local or s3://)")
    init_from: str | None = Field(
        None, description="LiT weight inheritance: start from a trained model's weights (an export dir, a step dir "
        "or a checkpoint root), every tensor whose name and shape match except the attention")
    distill_noise_lambda: float = Field(
        0.5, ge=0, description="LiT's λ1: weight of L_noise, the MSE to the teacher's velocity (paper: 0.5 at 256 px, "
        "1.0 at 512 px)")
    distill_var_lambda: float = Field(
        0.05, ge=0, description="LiT's λ2: weight of L_var, the MSE between the student's and the teacher's implied "
        "reverse-step variance (per-channel squared error to the sampled velocity; paper: 0.05)")
    pixel_branch: PixelBranchConfig | None = Field(
        None, description="Hi-DiT stage 2 (a model with pixel_stream, a cache with pixels); None = latent only "
        "(Hi-DiT stage 1: the pixel stream is frozen and unused)")
    repa: RepaConfig | None = Field(None, description="optional representation alignment (a model with repa_depth, "
                                    "a cache with pixels)")
    max_steps: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    seed: int = 0
    report_every: int = Field(50, ge=1, description="steps between ray.train.report / metrics (each costs ~ms-s)")
    checkpoint: CheckpointConfig
    validation: ValidationConfig = ValidationConfig()
    samples: SamplesConfig = SamplesConfig()
    scaling: WorkerScaling = WorkerScaling()
    ray_storage_path: str | None = Field(None, description="Ray Train's run directory; None = Ray's default")

    @model_validator(mode="after")
    def _check_run(self) -> TrainJobConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of max_steps and epochs")
        if self.batch_size % self.scaling.num_workers:
            raise ValueError(
                f"batch_size={self.batch_size} is not divisible by scaling.num_workers={self.scaling.num_workers}"
            )
        return self

    @property
    def batch_per_rank(self) -> int:
        return self.batch_size // self.scaling.num_workers
