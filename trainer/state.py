"""What a checkpoint restores: weights, EMA, AdamW and its schedule, every rank's RNG, step and data position."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from trainer.checkpoint import LoadedCheckpoint
from trainer.data import DataPosition
from trainer.step import Optimisation

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where a run is: the steps done, its data position, and the samples skipped (by reason) before this run."""

    step: int = 0
    position: DataPosition | None = None
    skipped_before: dict[str, int] = field(default_factory=dict)


def _rng_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {"generator": generator.get_state(), "torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng(generator: torch.Generator, world_size: int) -> dict[str, torch.Tensor]:
    """Every rank's RNG states keyed `rank<r>.<name>` (gathered so that rank 0 can save them; every rank calls it)."""
    local = _rng_state(generator)
    states = [local]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, local)
    return {f"rank{rank}.{name}": tensor for rank, state in enumerate(states) for name, tensor in state.items()}


def restore_rng(generator: torch.Generator, rng: dict[str, torch.Tensor], rank: int) -> None:
    prefix = f"rank{rank}."
    if f"{prefix}generator" not in rng:
        logger.warning("the checkpoint has no RNG state for rank %d (it ran with fewer workers): keeping a fresh one",
                       rank)
        return
    generator.set_state(rng[f"{prefix}generator"])
    torch.set_rng_state(rng[f"{prefix}torch_cpu"])
    if torch.cuda.is_available() and f"{prefix}torch_cuda" in rng:
        torch.cuda.set_rng_state(rng[f"{prefix}torch_cuda"])


def training_state(step: int, position: DataPosition, skipped: dict[str, int], optimisation: Optimisation,
                   config: dict[str, Any]) -> dict[str, Any]:
    """`state.json`: step, data position, LR schedule, samples skipped so far by reason, the effective config."""
    return {"step": step, "data_position": position.to_json(), "schedule": optimisation.schedule.state_dict(),
            "samples_skipped": skipped, "config": config}


def restore(checkpoint: LoadedCheckpoint, optimisation: Optimisation, generator: torch.Generator,
            rank: int) -> Progress:
    """Load a checkpoint into the run's parts and this rank's RNG; returns where the run resumes."""
    optimisation.model.load_state_dict(checkpoint.model)
    optimisation.ema.load_state_dict(checkpoint.ema)
    optimisation.optimizer.load_state_dict(checkpoint.optimizer)
    optimisation.schedule.load_state_dict(checkpoint.state["schedule"])
    restore_rng(generator, checkpoint.rng, rank)
    return Progress(checkpoint.step, DataPosition.from_json(checkpoint.state["data_position"]),
                    dict(checkpoint.state.get("samples_skipped", {})))
