"""Held-out loss at a fixed grid of t, and sample grids from fixed prompts, during training."""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from services import storage
from trainer.config import Precision, SamplesConfig
from trainer.data import CacheStream, ShardEntry, epoch_plan
from trainer.precision import autocast

logger = logging.getLogger(__name__)

SAMPLES_DIR = "samples"


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


def publish_sample_grid(export_dir: Path, samples: SamplesConfig, target_uri: str, device: torch.device) -> str:
    """Generate the fixed prompts with an exported (EMA) model and upload the PNGs + grid; returns the grid URI."""
    from trainer.generate import build_parser, generate

    with tempfile.TemporaryDirectory(prefix="hybriddit-samples-") as out:
        argv = ["--checkpoint", str(export_dir), "--out", out, "--steps", str(samples.steps),
                "--cfg", str(samples.cfg), "--sampler", samples.sampler, "--seed", str(samples.seed),
                "--device", str(device)]
        for prompt in samples.prompts:
            argv += ["--prompt", prompt]
        generate(build_parser().parse_args(argv))
        storage.upload_dir(out, target_uri)
    grid_uri = storage.join(target_uri, "grid.png")
    logger.info("uploaded sample grid %s", grid_uri)
    return grid_uri
