"""How a frozen encoder is built and run: options, precision, device, seeded random weights."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from services.encoders.errors import EncoderError

log = logging.getLogger(__name__)
OptionsT = TypeVar("OptionsT", bound=BaseModel)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_precision(
    device: str | torch.device, dtype: torch.dtype | str, what: str
) -> tuple[torch.device, torch.dtype]:
    """The requested dtype on CUDA; fp32 elsewhere, because bf16/fp16 CPU kernels are 50-250x slower."""
    device = torch.device(device)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise EncoderError(f"{what}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if device.type != "cuda" and dtype != torch.float32:
        log.info(
            "%s: running in float32 instead of %s on %s (reduced precision is slow there)",
            what,
            dtype,
            device,
        )
        dtype = torch.float32
    return device, dtype


def freeze(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Eval mode, no gradients, placed on `device` in `dtype`."""
    module = module.to(device)
    if any(parameter.dtype != dtype for parameter in module.parameters()):
        module = module.to(dtype)
    return module.eval().requires_grad_(False)


@contextmanager
def seeded_init(seed: int = 0) -> Iterator[None]:
    """Random weights that are the same on every build, without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def parse_options(model: type[OptionsT], name: str, options: dict[str, Any]) -> OptionsT:
    """Validate an encoder's keyword options; the error names the encoder, the option and the rule."""
    try:
        return model(**options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, item['loc']))}={item.get('input')!r}: {item['msg']}" for item in exc.errors()
        )
        allowed = sorted(model.model_fields) or "none"
        raise EncoderError(f"{name!r}: invalid options ({problems}); allowed options: {allowed}") from None
