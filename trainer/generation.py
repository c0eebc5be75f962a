"""Text-to-image in memory: a DiT with its codec and text encoder turns prompts into images.

    pipeline = load_export("s3://.../checkpoints", device)       # an export, a step dir or a checkpoint root
    images = generate_images(pipeline, ["a red fox"], SamplerSettings(steps=20, cfg=3.5))   # (N, 3, H, W) in [0, 1]

The CLI (`trainer/generate.py`), the sample grids of a training run and the evaluation job all call
these functions; only the CLI and the sample grids write PNGs, and nothing reads them back.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from services import storage
from services.cache.reader import pad_text
from trainer.flow_matching import decoded_latent_estimate, resolution_shift, velocity_of_clean_estimate
from trainer.samplers import (
    SamplerSettings,
    classifier_free_guidance,
    sample,
    sample_with_pixel_stream,
    text_velocity,
)

logger = logging.getLogger(__name__)

GRID_FILE = "grid.png"


@dataclass
class TextToImage:
    """A DiT and the frozen codec and text encoder it was trained with, on one device."""

    model: nn.Module
    codec: Any
    text_encoder: Any
    device: torch.device

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> padded text (B, L, D) and its mask (B, L), True = real token."""
        text, mask = pad_text([embedding.float().cpu().numpy() for embedding in self.text_encoder.encode(list(prompts))])
        return torch.from_numpy(text).to(self.device), torch.from_numpy(mask).to(self.device)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_decoding_codec(codec: dict[str, Any], device: torch.device, where: str) -> Any:
    """The codec of a description (`describe()`), which must decode; `where` names who needs it in the error."""
    from services.encoders import CodecError, build_codec

    built = build_codec(**{**codec, "device": device})
    if not built.spec.has_decoder:
        raise CodecError(f"{where} was trained on codec {built.spec.name!r}, which has no decoder; "
                         f"{built.decoder_alternative or 'retrain or export with a codec that decodes'}")
    return built


def build_text_to_image(model: nn.Module, codec: dict[str, Any], text_encoder: dict[str, Any],
                        device: torch.device, where: str) -> TextToImage:
    """Rebuild the codec and text encoder from their descriptions (`describe()`) and check them against `model`.

    `where` names the model's origin in errors (an export URI, "the training run").
    """
    from services.encoders import build_text_encoder

    built_codec = build_decoding_codec(codec, device, where)
    encoder = build_text_encoder(**{**text_encoder, "device": device})
    if encoder.spec.dim != model.config.text_dim:
        raise ValueError(f"text encoder {encoder.spec.name!r} gives {encoder.spec.dim}-d tokens, the model of "
                         f"{where} expects {model.config.text_dim}")
    return TextToImage(model, built_codec, encoder, device)


def load_export(uri: str, device: torch.device | str | None = None) -> TextToImage:
    """The model of an export (an export dir, a step dir, or a checkpoint root's newest verified step) with its
    codec and text encoder, ready to generate."""
    from trainer.checkpoint import resolve_export
    from trainer.export import load_exported_model

    device = torch.device(device) if device is not None else default_device()
    export_uri, _ = resolve_export(str(uri))
    model, exported = load_exported_model(export_uri, device)
    return build_text_to_image(model, exported.codec, exported.text_encoder, device, f"checkpoint {uri}")


def image_size(pipeline: TextToImage, size: tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) in pixels: `size`, checked against the codec and patch, or the training size."""
    downscale = pipeline.codec.spec.downscale
    height, width = size or (pipeline.model.config.latent_size * downscale,) * 2
    factor = downscale * pipeline.model.config.patch_size
    if height % factor or width % factor:
        raise ValueError(f"size {width}x{height} must be a multiple of {factor} (codec downscale x patch size)")
    return height, width


def streams_velocity(model: nn.Module, text: torch.Tensor, text_mask: torch.Tensor,
                     decode: Callable[[torch.Tensor], torch.Tensor]):
    """Hi-DiT: `((x, pixels), t) -> (latent velocity, pixel velocity)` for one batch of captions; the pixel velocity
    is the one its clean image (the decoded latent estimate plus the pixel stream's residual) implies."""
    def velocity(state: tuple[torch.Tensor, torch.Tensor], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, pixels = state
        out = model(x, t, text, text_mask, pixels=pixels)
        clean = decoded_latent_estimate(x, t, out.velocity, decode).to(pixels.dtype) + out.pixel_residual
        return out.velocity, velocity_of_clean_estimate(pixels, clean, t)

    return velocity


@torch.no_grad()  # else every sampler step keeps its autograd graph: gigabytes for a batch of 60
def generate_images(pipeline: TextToImage, prompts: Sequence[str], settings: SamplerSettings,
                    size: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1], one per prompt; batch k starts from noise seeded `settings.seed + its first
    prompt's index`, so a run split into chunks (seeded from their first index) gives the same images."""
    model, device = pipeline.model, pipeline.device
    height, width = image_size(pipeline, size)
    downscale = pipeline.codec.spec.downscale
    shape = (model.config.latent_channels, height // downscale, width // downscale)
    patch = model.config.patch_size
    shift = resolution_shift(settings.shift, settings.shift_base_tokens, (shape[1] // patch) * (shape[2] // patch))
    if settings.pixel_stream and not (model.config.pixel_stream and downscale == model.config.pixel_factor):
        raise ValueError(f"pixel_stream sampling needs a Hi-DiT model whose pixel_factor ({model.config.pixel_factor})"
                         f" is the codec's downscale ({downscale}); this model has pixel_stream="
                         f"{model.config.pixel_stream}: sample without pixel_stream")
    null_text, null_mask = pipeline.encode_prompts([""])
    decode = pipeline.codec.decode
    # bf16 autocast on CUDA; the CPU path stays fp32 (bf16 matmuls are far slower there)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    images = []
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start:start + settings.batch_size]
        text, mask = pipeline.encode_prompts(batch)
        unconditional = text_velocity(model, null_text.expand(len(batch), -1, -1), null_mask.expand(len(batch), -1))
        velocity = classifier_free_guidance(text_velocity(model, text, mask), unconditional, settings.cfg,
                                            (settings.guidance_low, settings.guidance_high))
        options = dict(sampler=settings.sampler, steps=settings.steps, shift=shift,
                       seed=settings.seed + start, device=device, sde_diffusion=settings.sde_diffusion)
        with autocast:
            if settings.pixel_stream:
                streams = classifier_free_guidance(
                    streams_velocity(model, text, mask, decode),
                    streams_velocity(model, null_text.expand(len(batch), -1, -1), null_mask.expand(len(batch), -1),
                                     decode),
                    settings.cfg, (settings.guidance_low, settings.guidance_high))
                pixels = sample_with_pixel_stream(velocity, streams, lambda z: decode(z.float()),
                                                  (len(batch), *shape), gate_t=model.config.pixel_gate_t, **options)
                images.append(((pixels.float() + 1) / 2).clamp(0, 1).cpu())
            else:
                latents = sample(velocity, (len(batch), *shape), **options)
                images.append(decode(latents.float()).float().cpu())
        logger.info("generated %d/%d images", start + len(batch), len(prompts))
    return torch.cat(images)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, H, W, 3) uint8, rounded as PNG writers round."""
    return (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


def file_stem(index: int, prompt: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9]+', '-', prompt).strip('-')[:48] or 'empty'}"


def image_grid(images: list):
    """A near-square grid of PIL images, the last row filled up with black tiles."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size)
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def write_images(out_uri: str, prompts: Sequence[str], images: torch.Tensor) -> list[str]:
    """`NNNN_<prompt>.png` per image and `grid.png` of them all under `out_uri` (local or s3://); returns the
    URIs, the grid last."""
    from PIL import Image

    pictures = [Image.fromarray(array) for array in to_uint8(images)]
    uris = []
    for index, (prompt, picture) in enumerate(zip(prompts, pictures, strict=True)):
        uris.append(storage.join(out_uri, f"{file_stem(index, prompt)}.png"))
        storage.write_bytes(uris[-1], _png(picture))
    uris.append(storage.join(out_uri, GRID_FILE))
    storage.write_bytes(uris[-1], _png(image_grid(pictures)))
    return uris
