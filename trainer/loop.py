"""The training loop of one DDP rank, with or without Ray: build the parts, resume, then step, report, validate,
checkpoint and sample until the last step."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services import storage
from trainer import checkpoint as ckpt
from trainer import state
from trainer.config import TrainJobConfig
from trainer.data import DataPosition, TrainingStream
from trainer.ema import EMA
from trainer.export import save_exported_model
from trainer.generation import build_decoding_codec
from trainer.inputs import ResolvedCache, build_job_model, load_teacher, total_steps
from trainer.models.hybrid_dit import DiTBlock
from trainer.optim import build_optimizer
from trainer.precision import apply_activation_checkpointing, convert_to_fp8, precision_for_device
from trainer.representation import build_feature_encoder
from trainer.step import Objective, Optimisation, train_step
from trainer.validation import SAMPLES_DIR, RunPictures, SampleGrids, replica_fingerprints, validation_loss

logger = logging.getLogger(__name__)

Reporter = Callable[[dict[str, float]], None]


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


class TrainingRun:
    """One rank of a run: builds the model, optimizer and stream, resumes, trains to the last step."""

    def __init__(self, config: TrainJobConfig, cache: ResolvedCache, context: RankContext | None = None,
                 reporter: Reporter | None = None, on_checkpoint: Callable[[float], None] | None = None,
                 on_skipped: Callable[[str, int], None] | None = None, stop_after: int | None = None) -> None:
        self.config = config
        self.cache = cache
        self.context = context or RankContext()
        self.reporter = reporter
        self.on_checkpoint = on_checkpoint
        self.on_skipped = on_skipped
        # Tests stop a run after this many steps (a simulated kill), without a final checkpoint.
        self.stop_after = stop_after
        self.precision = precision_for_device(config.precision, self.context.device, config.allow_fp8_fallback)
        self.total_steps = total_steps(config, cache)
        self._build()

    def _build(self) -> None:
        config, device = self.config, self.context.device
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        model = build_job_model(config, self.cache).to(device)
        ema = EMA(model, config.ema.decay)
        if config.activation_checkpointing:
            apply_activation_checkpointing(model, (DiTBlock,))
        if self.precision == "fp8":
            model = convert_to_fp8(model)
        network: nn.Module = model
        if self.context.world_size > 1:
            network = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer, schedule = build_optimizer(model, config.optimizer, self.total_steps)
        self.optimisation = Optimisation(model, torch.compile(network) if config.compile else network, optimizer,
                                         schedule, ema, config.optimizer.grad_clip)
        # A copy: the array arrives read-only (Ray passes numpy arrays out of its object store zero-copy).
        null_text = torch.tensor(self.cache.null_text, device=device) if self.cache.null_text is not None else None
        teacher = load_teacher(config, self.cache, device) if config.teacher else None
        feature_encoder = build_feature_encoder(config.repa.encoder, device) if config.repa else None
        if feature_encoder is not None and feature_encoder.dim != model.config.repa_dim:
            raise ValueError(f"repa.encoder {config.repa.encoder} gives {feature_encoder.dim}-d features; the model's "
                             f"REPA projector gives repa_dim={model.config.repa_dim}: set model.overrides.repa_dim")
        decode = (build_decoding_codec(self.cache.codec, device, "Hi-DiT's pixel branch").decode
                  if config.pixel_branch else None)
        self.objective = Objective(config, null_text, teacher, model.config, feature_encoder, decode)
        self.generator = torch.Generator(device).manual_seed(config.seed * 100_003 + self.context.rank)
        self.progress = state.Progress()
        self._skips_reported: Counter[str] = Counter()
        self.reported_losses: list[float] = []  # mean training loss of each report window of this run
        if config.checkpoint.resume:
            self._resume()
        self.publisher = ckpt.CheckpointPublisher(config.checkpoint.uri, config.checkpoint.keep_last)
        self.sample_grids = SampleGrids(config.samples, self.cache.codec, self.cache.text_encoder,
                                        storage.join(config.checkpoint.uri, SAMPLES_DIR), device)
        self.pictures = RunPictures(config.checkpoint.uri, config.samples.prompts, config.run_name)

    @property
    def model(self) -> nn.Module:
        return self.optimisation.model

    @property
    def ema(self) -> EMA:
        return self.optimisation.ema

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def position(self) -> DataPosition | None:
        return self.progress.position

    def _resume(self) -> None:
        settings = self.config.checkpoint
        checkpoint = ckpt.load_latest(settings.uri)
        if checkpoint is None and settings.resume_from is not None:
            checkpoint = ckpt.load_latest(settings.resume_from)
            if checkpoint is None:
                raise FileNotFoundError(f"checkpoint.resume_from={settings.resume_from} holds no complete checkpoint "
                                        "(finish that run first, or unset resume_from)")
            logger.info("no checkpoint under %s yet: continuing run %s from its step %d (the global step is kept: "
                        "max_steps counts both runs)", settings.uri, settings.resume_from, checkpoint.step)
        if checkpoint is None:
            logger.info("no checkpoint under %s: starting at step 0", self.config.checkpoint.uri)
            return
        self.progress = state.restore(checkpoint, self.optimisation, self.generator, self.context.rank)
        logger.info("resumed from %s at step %d, data position %s", checkpoint.uri, self.step, self.position)

    def data_stream(self) -> TrainingStream:
        config = self.config
        return TrainingStream(
            self.cache.train_shards, seed=config.seed, rank=self.context.rank,
            world_size=self.context.world_size, batch_per_rank=config.batch_per_rank,
            window_shards=config.data.shuffle_window_shards, placeholder_text=self._placeholder_text(),
            prefetch_shards=config.data.prefetch_shards, fail_on_corrupt=config.data.fail_on_corrupt,
            start=self.position, loader_process=config.data.loader_process,
            prefetch_batches=config.data.prefetch_batches, batch_timeout_s=config.data.batch_timeout_s)

    def train_step(self, batch: dict[str, Any]) -> tuple[float, float]:
        """One optimisation step on `batch` -> (loss, grad norm before clipping)."""
        return train_step(self.optimisation, self.objective, batch, generator=self.generator,
                          precision=self.precision, device=self.context.device)

    # ----------------------------------------------------------------------- the loop

    def run(self) -> dict[str, Any]:
        """Train from the current step to the last one; returns the final metrics."""
        config = self.config
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
                self.progress.step += 1
                self.progress.position = stream.position
                steps_this_run += 1
                stats.steps += 1
                stats.loss += loss
                finished = self.step == self.total_steps
                if self.step % config.report_every == 0 or finished:
                    last = self._report(stats, grad_norm, stream)
                    stats = StepStats()
                if config.validation.enabled and (self.step % config.validation.every_steps == 0 or finished):
                    last = {**last, **self.validate()}
                if self.step % config.checkpoint.every_steps == 0 or finished:
                    self.save(stream)
                if config.samples.enabled and (self.step % config.samples.every_steps == 0 or finished):
                    self.sample_grid()
                if self.stop_after is not None and steps_this_run >= self.stop_after and not finished:
                    break
        finally:
            batches.close()  # stops the loader process now, not at garbage collection
        self.publisher.wait()
        return {**last, "step": self.step, "samples_skipped": self._skipped(stream),
                "reported_losses": self.reported_losses,
                "replica_fingerprints": replica_fingerprints(self.model, self.context.world_size, self.context.device)}

    # ----------------------------------------------------------------------- what the loop calls

    def _skipped(self, stream: TrainingStream) -> dict[str, int]:
        total = dict(self.progress.skipped_before)
        for reason, count in stream.skipped.items():
            total[reason] = total.get(reason, 0) + count
        return total

    def _report(self, stats: StepStats, grad_norm: float, stream: TrainingStream) -> dict[str, float]:
        seconds = max(time.perf_counter() - stats.started, 1e-9)
        metrics = {
            "step": float(self.step),
            "loss": stats.loss / stats.steps,
            "grad_norm": grad_norm,
            "lr": self.optimisation.schedule.get_last_lr()[0],
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
        if self.cache.null_text is not None:
            return self.cache.null_text
        return np.zeros((1, self.model.config.text_dim), np.float32)

    def validate(self) -> dict[str, float]:
        """Held-out loss per t bin of the current weights, reported like the training metrics and plotted by rank 0."""
        config = self.config
        metrics = validation_loss(
            self.model, self.cache.validation_shards, t_grid=config.validation.t_grid,
            batch_per_rank=config.batch_per_rank, max_batches=config.validation.max_batches,
            rank=self.context.rank, world_size=self.context.world_size, device=self.context.device,
            precision=self.precision, placeholder_text=self._placeholder_text(), seed=config.seed)
        logger.info("step %d validation: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        if self.context.rank == 0:
            logger.info("validation plot %s", self.pictures.record_validation(self.step, metrics))
        if self.reporter is not None:
            self.reporter({"step": float(self.step), **metrics})
        return metrics

    def sample_grid(self) -> None:
        """Rank 0 renders the fixed prompts with the EMA weights into `<checkpoint uri>/samples/step_NNNNNNN/` and
        adds them to progress.png."""
        if self.context.rank == 0:
            self.sample_grids.publish(self.ema.module, ckpt.step_dir_name(self.step))
            logger.info("progress image %s", self.pictures.assemble_progress())

    def save(self, stream: TrainingStream) -> None:
        """Checkpoint on rank 0 (every rank takes part in gathering the RNG states)."""
        rng = state.gather_rng(self.generator, self.context.world_size)
        if self.context.rank != 0:
            return
        cache, optimisation = self.cache, self.optimisation
        stall = self.publisher.save(
            self.step, model=self.model.state_dict(), optimizer=optimisation.optimizer.state_dict(), rng=rng,
            state=state.training_state(self.step, stream.position, self._skipped(stream), optimisation,
                                       self.config.model_dump(mode="json")),
            write_export=lambda directory: save_exported_model(
                directory, self.ema.module, codec=cache.codec, text_encoder=cache.text_encoder,
                latent_normalisation=cache.latent_normalisation, state_dict=self.ema.state_dict()),
        )
        logger.info("checkpoint step %d: training stalled %.3f s (upload continues in the background)",
                    self.step, stall)
        if self.on_checkpoint is not None:
            self.on_checkpoint(stall)
