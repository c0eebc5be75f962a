"""What a run checks about its weights: held-out loss at a fixed grid of t, sample grids from fixed prompts, and
that DDP replicas agree; and the pictures of both next to the checkpoints (`RunPictures`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from services import storage
from trainer.config import Precision, SamplesConfig
from trainer.data import CacheStream, ShardEntry, epoch_plan
from trainer.generation import TextToImage, build_text_to_image, generate_images, write_images
from trainer.precision import autocast

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
VALIDATION_FILE = "validation.json"  # every validation of the run: step and held-out loss per t bin
VALIDATION_PLOT = "val_loss.png"
PROGRESS_IMAGE = "progress.png"


@torch.no_grad()
def validation_loss(model: nn.Module, shards: Sequence[ShardEntry], *, t_grid: Sequence[float],
                    batch_per_rank: int, max_batches: int, rank: int, world_size: int, device: torch.device,
                    precision: Precision, placeholder_text: np.ndarray, seed: int = 0) -> dict[str, float]:
    """Mean velocity MSE per t bin over the held-out shards (same noise every call; summed over ranks).

    Returns `val_loss_t<t>` per grid point and their mean `val_loss`.
    """
    plan = epoch_plan(shards, seed=seed, epoch=0, rank=rank, world_size=world_size,
                      batch_per_rank=batch_per_rank, window_shards=1)[:max_batches]
    grid = torch.tensor(list(t_grid), dtype=torch.float32, device=device)
    sums = torch.zeros(len(grid) + 1, dtype=torch.float64, device=device)  # per-bin losses, then sample count
    was_training = model.training
    model.eval()
    for index, batch in enumerate(CacheStream(shards, plan, placeholder_text=placeholder_text, prefetch_shards=1)):
        x0 = batch["latent"].to(device)
        text, mask = batch["text"].to(device), batch["text_mask"].to(device)
        weights = batch["weights"].to(device, torch.float64)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 7919 + index)).to(device)
        for bin_index, t in enumerate(grid):
            x_t = (1 - t) * x0 + t * noise
            with autocast(precision, device):
                prediction = model(x_t, t.expand(x0.shape[0]), text, mask)
            per_sample = (prediction.float() - (noise - x0)).pow(2).flatten(1).mean(dim=1)
            sums[bin_index] += (weights * per_sample.double()).sum()
        sums[-1] += weights.sum()
    model.train(was_training)
    if world_size > 1:
        dist.all_reduce(sums)
    if sums[-1] == 0:
        raise ValueError(
            f"the held-out shards give no full validation batch of {batch_per_rank} per rank: hold out more "
            "shards (validation.holdout_shards) or give bigger validation caches"
        )
    per_bin = {f"val_loss_t{float(t):.2f}": float(sums[i] / sums[-1]) for i, t in enumerate(grid)}
    return {**per_bin, "val_loss": float(np.mean(list(per_bin.values())))}


class SampleGrids:
    """Images of the fixed prompts from the EMA weights, written under `<target>/step_NNNNNNN/` (rank 0 only).

    The codec and text encoder the cache was encoded with are built once, on the first grid.
    """

    def __init__(self, settings: SamplesConfig, codec: dict[str, Any], text_encoder: dict[str, Any],
                 target_uri: str, device: torch.device) -> None:
        self.settings = settings
        self.codec, self.text_encoder = codec, text_encoder
        self.target_uri = target_uri
        self.device = device
        self._encoders: TextToImage | None = None

    def publish(self, model: nn.Module, step_dir: str) -> str:
        """Generate the prompts with `model` and write the PNGs and grid; returns the grid's URI."""
        if self._encoders is None:
            self._encoders = build_text_to_image(model, self.codec, self.text_encoder, self.device, "the training run")
        pipeline = replace(self._encoders, model=model)
        images = generate_images(pipeline, self.settings.prompts, self.settings)
        grid_uri = write_images(storage.join(self.target_uri, step_dir), self.settings.prompts, images)[-1]
        logger.info("wrote sample grid %s", grid_uri)
        return grid_uri


class RunPictures:
    """Rank 0's pictures of a run, redrawn next to the checkpoints after each validation and each sample grid:
    `validation.json` + `val_loss.png` (held-out loss per t bin against step) and `progress.png` (the sample
    grids, a row per step). A resumed run keeps the history before its step and redoes the rest.
    """

    def __init__(self, checkpoint_uri: str, prompts: Sequence[str], run_name: str) -> None:
        self.checkpoint_uri = checkpoint_uri
        self.prompts = list(prompts)
        self.run_name = run_name

    def record_validation(self, step: int, metrics: dict[str, float]) -> str:
        """Add a validation to the run's history and redraw the plot; returns the plot's URI."""
        from trainer.evaluation.plots import validation_figure

        history_uri = storage.join(self.checkpoint_uri, VALIDATION_FILE)
        history = storage.read_json(history_uri) if storage.exists(history_uri) else []
        history = [entry for entry in history if entry["step"] < step] + [{"step": step, **metrics}]
        storage.write_json(history_uri, history)
        plot_uri = storage.join(self.checkpoint_uri, VALIDATION_PLOT)
        storage.write_bytes(plot_uri, validation_figure(history, title=f"{self.run_name}: held-out loss"))
        return plot_uri

    def assemble_progress(self) -> str:
        """progress.png from every sample grid written so far; returns its URI."""
        from trainer.evaluation.progress import png_bytes, progress_image, sample_rows

        image = progress_image(sample_rows(storage.join(self.checkpoint_uri, SAMPLES_DIR)), self.prompts)
        uri = storage.join(self.checkpoint_uri, PROGRESS_IMAGE)
        storage.write_bytes(uri, png_bytes(image))
        return uri


@torch.no_grad()
def replica_fingerprints(model: nn.Module, world_size: int, device: torch.device) -> list[float]:
    """One number per rank summarising its weights (a position-weighted sum): equal when DDP ranks are in sync."""
    fingerprint = torch.zeros(1, dtype=torch.float64, device=device)
    for index, param in enumerate(model.parameters()):
        weights = torch.linspace(1.0, 2.0, param.numel(), dtype=torch.float64, device=param.device)
        fingerprint += (param.detach().double().flatten() * weights).sum() * (index + 1)
    if world_size == 1:
        return [float(fingerprint)]
    gathered = [torch.zeros_like(fingerprint) for _ in range(world_size)]
    dist.all_gather(gathered, fingerprint)
    return [float(value) for value in gathered]
