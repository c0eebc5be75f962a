"""The training loop of one DDP rank, usable with or without Ray: data, step, EMA, checkpoints, reports."""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from services import storage
from services.cache import layout, manifest, reader
from services.cache.schema import npy_view
from trainer import checkpoint as ckpt
from trainer.config import TrainJobConfig
from trainer.data import DataPosition, ShardEntry, TrainingStream, index_shards, select_buckets, split_holdout
from trainer.data import steps_per_epoch as count_steps_per_epoch
from trainer.ema import EMA
from trainer.export import LatentNormalisation, load_exported_model, save_exported_model
from trainer.flow_matching import flow_matching_loss
from trainer.models import build_model, resolve_config
from trainer.models.hybrid_dit import DiTBlock
from trainer.optim import build_optimizer
from trainer.precision import apply_activation_checkpointing, autocast, convert_to_fp8, precision_for_device
from trainer.validation import SAMPLES_DIR, publish_sample_grid, validation_loss

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, float]], None]


@dataclass
class Dataset:
    """What the driver resolves once and hands every rank: shard index, null text and the cache's encoders."""

    train_shards: list[ShardEntry]
    validation_shards: list[ShardEntry]
    null_text: np.ndarray | None
    codec: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    latent_normalisation: LatentNormalisation | None = None


def _first_cache_card(uris: list[str]) -> manifest.CacheManifest | None:
    for uri in uris:
        if not uri.endswith(".tar") and storage.exists(layout.manifest_uri(uri)):
            return manifest.read_manifest(uri)
    return None


def _normalisation(card: manifest.CacheManifest) -> LatentNormalisation | None:
    if isinstance(card.latent_scale, float | int) and isinstance(card.latent_shift, float | int):
        return LatentNormalisation(scale=card.latent_scale, shift=card.latent_shift)
    logger.warning("per-channel latent normalisation is not recorded in the export's model_config.json")
    return None


def resolve_dataset(config: TrainJobConfig) -> Dataset:
    """Index the training and validation shards and load the null text (reads manifests, not shards)."""
    data = config.data
    shards = select_buckets(index_shards(data.uris, fail_on_corrupt=data.fail_on_corrupt), data.buckets)
    validation_shards: list[ShardEntry] = []
    if config.validation.holdout_shards:
        shards, validation_shards = split_holdout(shards, config.validation.holdout_shards)
    if config.validation.uris:
        validation_shards += select_buckets(index_shards(config.validation.uris), data.buckets)
    card = _first_cache_card(data.uris)
    null_text = None
    if data.null_text_uri is not None:
        null_text = npy_view(storage.read_bytes(data.null_text_uri), data.null_text_uri).astype(np.float32)
    elif card is not None:
        null_text = reader.load_null_text(next(u for u in data.uris if not u.endswith(".tar")))
    if null_text is None and config.cfg_dropout > 0:
        raise ValueError(
            f"cfg_dropout={config.cfg_dropout} needs the null text: this cache has no {layout.NULL_TEXT}; "
            "set data.null_text_uri to the encoder's (L, D) .npy for the empty prompt, or cfg_dropout=0"
        )
    return Dataset(shards, validation_shards, null_text,
                   codec=card.codec if card else {}, text_encoder=card.text_encoder if card else {},
                   latent_normalisation=_normalisation(card) if card else None)


def total_steps(config: TrainJobConfig, dataset: Dataset) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * count_steps_per_epoch(
        dataset.train_shards, world_size=config.scaling.num_workers, batch_per_rank=config.batch_per_rank,
        seed=config.seed, window_shards=config.data.shuffle_window_shards)


def build_job_model(config: TrainJobConfig, dataset: Dataset) -> nn.Module:
    """The configured DiT, checked against the cache's latent channels and text width."""
    model_config = resolve_config(config.model.preset)
    if config.model.overrides:
        model_config = type(model_config).model_validate({**model_config.model_dump(), **config.model.overrides})
    channels = {shard.latent_channels for shard in dataset.train_shards}
    if channels != {model_config.latent_channels}:
        raise ValueError(f"model {config.model.preset} takes {model_config.latent_channels} latent channels; "
                         f"the cache holds {sorted(channels)}: pick a preset or model.overrides that match")
    if dataset.null_text is not None and dataset.null_text.shape[1] != model_config.text_dim:
        raise ValueError(f"model {config.model.preset} takes text_dim={model_config.text_dim}; the cache's text "
                         f"encoder gives {dataset.null_text.shape[1]}: set model.overrides.text_dim")
    return build_model(model_config)


class TeacherMatching(nn.Module):
    """LiT distillation: runs the student and records its per-sample MSE to a frozen teacher's velocity."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher.requires_grad_(False).eval()
        self.per_sample: torch.Tensor | None = None

    def forward(self, x, t, text, text_mask):
        velocity = self.student(x, t, text, text_mask)
        with torch.no_grad():
            target = self.teacher(x, t, text, text_mask)
        self.per_sample = (velocity.float() - target.float()).pow(2).flatten(1).mean(dim=1)
        return velocity


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def _gather_rng(generator: torch.Generator, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's RNG states keyed `rank<r>.<name>` (gathered so that rank 0 can save them)."""
    local = _rng_state(generator)
    states = [local]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, local)
    return {f"rank{rank}.{name}": tensor for rank, state in enumerate(states) for name, tensor in state.items()}


def _restore_rng(generator: torch.Generator, rng: dict[str, torch.Tensor], rank: int) -> None:
    prefix = f"rank{rank}."
    if f"{prefix}generator" not in rng:
        logger.warning("the checkpoint has no RNG state for rank %d (it ran with fewer workers): keeping a fresh one",
                       rank)
        return
    generator.set_state(rng[f"{prefix}generator"])
    torch.set_rng_state(rng[f"{prefix}torch_cpu"])
    if torch.cuda.is_available() and f"{prefix}torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"{prefix}torch_cuda"])


@dataclass
class RankContext:
    """Where this rank runs."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))


@dataclass
class StepStats:
    """Sums over the steps since the last report."""

    steps: int = 0
    loss: float = 0.0
    data_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """One rank of a run: builds the model, optimizer and stream, resumes, trains to the last step."""

    def __init__(self, config: TrainJobConfig, dataset: Dataset, context: RankContext | None = None,
                 reporter: Reporter | None = None, on_checkpoint: Callable[[float], None] | None = None,
                 on_skipped: Callable[[str, int], None] | None = None, stop_after: int | None = None) -> None:
        self.config = config
        self.dataset = dataset
        self.context = context or RankContext()
        self.reporter = reporter
        self.on_checkpoint = on_checkpoint
        self.on_skipped = on_skipped
        # Tests stop a run after this many steps (a simulated kill), without a final checkpoint.
        self.stop_after = stop_after
        self.precision = precision_for_device(config.precision, self.context.device, config.allow_fp8_fallback)
        self.total_steps = total_steps(config, dataset)
        self._build()

    # ----------------------------------------------------------------------- setup

    def _build(self) -> None:
        config, device = self.config, self.context.device
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = build_job_model(config, self.dataset).to(device)
        self.ema = EMA(self.model, config.ema.decay)
        if config.activation_checkpointing:
            apply_activation_checkpointing(self.model, (DiTBlock,))
        if self.precision == "fp8":
            self.model = convert_to_fp8(self.model)
        network: nn.Module = self.model
        if self.context.world_size > 1:
            network = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.teacher_matching: TeacherMatching | None = None
        if config.teacher is not None:
            teacher, _ = load_exported_model(config.teacher, device)
            network = self.teacher_matching = TeacherMatching(network, teacher)
        self.network = torch.compile(network) if config.compile else network
        self.optimizer, self.schedule = build_optimizer(self.model, config.optimizer, self.total_steps)
        self.generator = torch.Generator(device).manual_seed(config.seed * 100_003 + self.context.rank)
        # A copy: the array arrives read-only (Ray passes numpy arrays out of its object store zero-copy).
        self.null_text = (torch.tensor(self.dataset.null_text, device=device)
                          if self.dataset.null_text is not None else None)
        self.step = 0
        self.position: DataPosition | None = None
        self.skipped_before: dict[str, int] = {}
        self._skips_reported: Counter[str] = Counter()
        self.reported_losses: list[float] = []  # mean training loss of each report window of this run
        if config.checkpoint.resume:
            self._resume()
        self.publisher = ckpt.CheckpointPublisher(config.checkpoint.uri, config.checkpoint.keep_last)

    def _resume(self) -> None:
        checkpoint = ckpt.load_latest(self.config.checkpoint.uri)
        if checkpoint is None:
            logger.info("no checkpoint under %s: starting at step 0", self.config.checkpoint.uri)
            return
        self.model.load_state_dict(checkpoint.model)
        self.ema.load_state_dict(checkpoint.ema)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.schedule.load_state_dict(checkpoint.state["schedule"])
        _restore_rng(self.generator, checkpoint.rng, self.context.rank)
        self.step = checkpoint.step
        self.position = DataPosition.from_json(checkpoint.state["data_position"])
        self.skipped_before = dict(checkpoint.state.get("samples_skipped", {}))
        logger.info("resumed from %s at step %d, data position %s", checkpoint.uri, self.step, self.position)

    def data_stream(self) -> TrainingStream:
        config = self.config
        return TrainingStream(
            self.dataset.train_shards, seed=config.seed, rank=self.context.rank,
            world_size=self.context.world_size, batch_per_rank=config.batch_per_rank,
            window_shards=config.data.shuffle_window_shards, placeholder_text=self._placeholder_text(),
            prefetch_shards=config.data.prefetch_shards, fail_on_corrupt=config.data.fail_on_corrupt,
            start=self.position, loader_process=config.data.loader_process,
            prefetch_batches=config.data.prefetch_batches, batch_timeout_s=config.data.batch_timeout_s)

    # ----------------------------------------------------------------------- one step

    def train_step(self, batch: dict[str, Any]) -> tuple[float, float]:
        """Forward, backward, clip, AdamW and EMA on one batch -> (loss, grad norm before clipping)."""
        device = self.context.device
        latent = batch["latent"].to(device, non_blocking=True)
        text = batch["text"].to(device, non_blocking=True)
        text_mask = batch["text_mask"].to(device, non_blocking=True)
        weights = batch["weights"].to(device)
        self.model.train()
        with autocast(self.precision, device):
            loss, _, _ = flow_matching_loss(
                self.network, latent, text, text_mask, sampling=self.config.timesteps, null_text=self.null_text,
                cfg_dropout=self.config.cfg_dropout, weights=weights, generator=self.generator)
            if self.teacher_matching is not None:
                per_sample = self.teacher_matching.per_sample
                distill = (weights * per_sample).sum() / weights.sum().clamp(min=1e-12)
                loss = loss + self.config.distill_lambda * distill
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip = self.config.optimizer.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip else float("inf"))
        self.optimizer.step()
        self.schedule.step()
        self.ema.update(self.model)
        return float(loss.detach()), float(grad_norm)

    # ----------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train from the current step to the last one; returns the final metrics."""
        stream = self.data_stream()
        batches = iter(stream)
        stats = StepStats()
        last: dict[str, float] = {}
        steps_this_run = 0
        try:
            while self.step < self.total_steps:
                waited = time.perf_counter()
                batch = next(batches)
                stats.data_seconds += time.perf_counter() - waited
                loss, grad_norm = self.train_step(batch)
                self.step += 1
                steps_this_run += 1
                stats.steps += 1
                stats.loss += loss
                self.position = stream.position
                finished = self.step == self.total_steps
                if self.step % self.config.report_every == 0 or finished:
                    last = self._report(stats, grad_norm, stream)
                    stats = StepStats()
                if self.config.validation.enabled and (self.step % self.config.validation.every_steps == 0 or finished):
                    last = {**last, **self.validate()}
                if self.step % self.config.checkpoint.every_steps == 0 or finished:
                    self.save(stream)
                if self.config.samples.enabled and (self.step % self.config.samples.every_steps == 0 or finished):
                    self.sample_grid()
                if self.stop_after is not None and steps_this_run >= self.stop_after and not finished:
                    break
        finally:
            batches.close()  # stops the loader process now, not at garbage collection
        self.publisher.wait()
        return {**last, "step": self.step, "samples_skipped": self._skipped(stream),
                "reported_losses": self.reported_losses,
                "replica_fingerprints": self.replica_fingerprints()}

    @torch.no_grad()
    def replica_fingerprints(self) -> list[float]:
        """One number per rank summarising its weights (a position-weighted sum): equal when ranks are in sync."""
        fingerprint = torch.zeros(1, dtype=torch.float64, device=self.context.device)
        for index, param in enumerate(self.model.parameters()):
            weights = torch.linspace(1.0, 2.0, param.numel(), dtype=torch.float64, device=param.device)
            fingerprint += (param.detach().double().flatten() * weights).sum() * (index + 1)
        if self.context.world_size == 1:
            return [float(fingerprint)]
        gathered = [torch.zeros_like(fingerprint) for _ in range(self.context.world_size)]
        dist.all_gather(gathered, fingerprint)
        return [float(value) for value in gathered]

    def _skipped(self, stream: TrainingStream) -> dict[str, int]:
        total = dict(self.skipped_before)
        for reason, count in stream.skipped.items():
            total[reason] = total.get(reason, 0) + count
        return total

    def _report(self, stats: StepStats, grad_norm: float, stream: TrainingStream) -> dict[str, float]:
        seconds = max(time.perf_counter() - stats.started, 1e-9)
        metrics = {
            "step": float(self.step),
            "loss": stats.loss / stats.steps,
            "grad_norm": grad_norm,
            "lr": self.schedule.get_last_lr()[0],
            "steps_per_second": stats.steps / seconds,
            "samples_per_second": stats.steps * self.config.batch_size / seconds,
            "data_wait_fraction": min(1.0, stats.data_seconds / seconds),
        }
        self.reported_losses.append(metrics["loss"])
        logger.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k != "step"))
        if self.on_skipped is not None:
            for reason, count in stream.skipped.items():
                new = count - self._skips_reported.get(reason, 0)
                if new:
                    self.on_skipped(reason, new)
            self._skips_reported = Counter(stream.skipped)
        if self.reporter is not None:
            self.reporter(metrics)
        return metrics

    def _placeholder_text(self) -> np.ndarray:
        if self.dataset.null_text is not None:
            return self.dataset.null_text
        return np.zeros((1, self.model.config.text_dim), np.float32)

    def validate(self) -> dict[str, float]:
        """Held-out loss per t bin of the current weights, reported like the training metrics."""
        config = self.config
        metrics = validation_loss(
            self.model, self.dataset.validation_shards, t_grid=config.validation.t_grid,
            batch_per_rank=config.batch_per_rank, max_batches=config.validation.max_batches,
            rank=self.context.rank, world_size=self.context.world_size, device=self.context.device,
            precision=self.precision, placeholder_text=self._placeholder_text(), seed=config.seed)
        logger.info("step %d validation: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.reporter is not None:
            self.reporter({"step": float(self.step), **metrics})
        return metrics

    def sample_grid(self) -> None:
        """Rank 0 renders the fixed prompts with the EMA weights into `<checkpoint uri>/samples/step_NNNNNNN/`."""
        if self.context.rank != 0:
            return
        dataset = self.dataset
        with tempfile.TemporaryDirectory(prefix="hybriddit-ema-") as export_dir:
            save_exported_model(export_dir, self.ema.module, codec=dataset.codec, text_encoder=dataset.text_encoder,
                                latent_normalisation=dataset.latent_normalisation)
            target = storage.join(self.config.checkpoint.uri, SAMPLES_DIR, ckpt.step_dir_name(self.step))
            publish_sample_grid(Path(export_dir), self.config.samples, target, self.context.device)

    def save(self, stream: TrainingStream) -> None:
        """Checkpoint on rank 0 (every rank takes part in gathering the RNG states)."""
        rng = _gather_rng(self.generator, self.context.world_size)
        if self.context.rank != 0:
            return
        skipped = self._skipped(stream)
        state = {
            "step": self.step,
            "data_position": stream.position.to_json(),
            "schedule": self.schedule.state_dict(),
            "samples_skipped": skipped,
            "config": self.config.model_dump(mode="json"),
        }
        dataset = self.dataset
        stall = self.publisher.save(
            self.step, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(), rng=rng, state=state,
            write_export=lambda directory: save_exported_model(
                directory, self.ema.module, codec=dataset.codec, text_encoder=dataset.text_encoder,
                latent_normalisation=dataset.latent_normalisation, state_dict=self.ema.state_dict()),
        )
        logger.info("checkpoint step %d: training stalled %.3f s (upload continues in the background)",
                    self.step, stall)
        if self.on_checkpoint is not None:
            self.on_checkpoint(stall)
