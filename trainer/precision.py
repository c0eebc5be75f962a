"""Numeric precision of a run: fp32, bf16 autocast, or torchao FP8 training (CUDA only), then compile."""

from __future__ import annotations

import contextlib
import logging
from functools import partial

import torch
from torch import nn

from trainer.config import Precision

logger = logging.getLogger(__name__)

# torchao's float8 matmuls need SM 8.9+ (Ada, Hopper); it does not refuse other devices itself.
FP8_MIN_CAPABILITY = (8, 9)
FP8_DIM_MULTIPLE = 16


class PrecisionUnavailableError(RuntimeError):
    """The requested precision cannot run on this device."""


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def precision_for_device(requested: Precision, device: torch.device, allow_fp8_fallback: bool) -> Precision:
    """The precision this device will run: refuses bf16/fp8 off CUDA, FP8 below SM 8.9 unless fallback is allowed."""
    if requested == "fp8" and not fp8_supported(device):
        fallback: Precision = "bf16" if device.type == "cuda" else "fp32"
        if not allow_fp8_fallback:
            raise PrecisionUnavailableError(
                f"precision=fp8 needs a CUDA GPU with compute capability >= {FP8_MIN_CAPABILITY} "
                f"(torchao float8); this worker has {describe_device(device)}. Use precision=bf16/fp32, "
                f"or set allow_fp8_fallback=true to train in {fallback} here"
            )
        logger.warning("precision=fp8 is unavailable on %s: falling back to %s (allow_fp8_fallback=true)",
                       describe_device(device), fallback)
        return fallback
    if requested == "bf16" and device.type != "cuda":
        raise PrecisionUnavailableError(
            f"precision=bf16 autocast is only used on CUDA; this worker has {describe_device(device)} "
            "(bf16 is 50-250x slower than fp32 on CPUs without AVX512-BF16): use precision=fp32"
        )
    return requested


def describe_device(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    major, minor = torch.cuda.get_device_capability(device)
    return f"{torch.cuda.get_device_name(device)} (SM {major}.{minor})"


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % FP8_DIM_MULTIPLE == 0
            and module.out_features % FP8_DIM_MULTIPLE == 0)


def convert_to_fp8(model: nn.Module) -> nn.Module:
    """Swap Linears whose dims are multiples of 16 for torchao Float8Linear (tensorwise scaling)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    return convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=_fp8_eligible
    )


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for bf16/fp8 runs on CUDA (FP8 Linears run their own casts); fp32 runs as is."""
    if precision in ("bf16", "fp8"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def apply_activation_checkpointing(model: nn.Module, block_types: tuple[type[nn.Module], ...]) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing as wrap_blocks,
    )

    wrap_blocks(
        model,
        checkpoint_wrapper_fn=partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda module: isinstance(module, block_types),
    )
