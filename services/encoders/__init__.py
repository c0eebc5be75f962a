"""Frozen encoder registry: a name -> an image codec or text encoder with its preprocessing and normalisation."""

from __future__ import annotations

from typing import Any

import torch

from services.encoders.codec import Codec, CodecSpec
from services.encoders.codecs import CODECS, DEFAULT_CODEC
from services.encoders.errors import CodecError, EncoderError
from services.encoders.text import DEFAULT_TEXT_ENCODER, TEXT_ENCODERS, TextEncoder, TextEncoderSpec

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "DEFAULT_TEXT_ENCODER",
    "TEXT_ENCODERS",
    "Codec",
    "CodecError",
    "CodecSpec",
    "EncoderError",
    "TextEncoder",
    "TextEncoderSpec",
    "build_codec",
    "build_text_encoder",
]


def build_codec(
    name: str = DEFAULT_CODEC,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tiny: bool = False,
    **options: Any,
) -> Codec:
    """The frozen image codec called `name`; tiny=True gives its tiny seeded-random version for tests."""
    if name not in CODECS:
        raise EncoderError(f"unknown codec {name!r}; known codecs: {sorted(CODECS)}")
    return CODECS[name](name, tiny=tiny, device=device, dtype=dtype, **options)


def build_text_encoder(
    name: str = DEFAULT_TEXT_ENCODER,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    tiny: bool = False,
    **options: Any,
) -> TextEncoder:
    """The frozen text encoder called `name`; tiny=True gives its tiny seeded-random version for tests."""
    if name not in TEXT_ENCODERS:
        raise EncoderError(f"unknown text encoder {name!r}; known text encoders: {sorted(TEXT_ENCODERS)}")
    return TEXT_ENCODERS[name](name, tiny=tiny, device=device, dtype=dtype, **options)
