"""The exported model: `model.safetensors` + `model_config.json` (DiT config, codec, text encoder, latent norm).

An export carries its own `_COMPLETE.json` (sizes and sha256 of both files, see `services.storage`),
written last; every load checks the files against it, so a damaged or tampered export is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from services import storage
from services.config import StrictModel
from trainer.models import DiTConfig, HybridDiT

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model_config.json"
FORMAT = "hybriddit.model/1"


class LatentNormalisation(StrictModel):
    """The codec's normalisation the training latents carried: `latent = (raw - shift) · scale`, one value or one
    per channel (as the cache's manifest records it)."""

    scale: float | list[float] = 1.0
    shift: float | list[float] = 0.0


class ExportedModelConfig(StrictModel):
    """`model_config.json`: everything needed to rebuild the model and turn prompts into images with it."""

    format: str = FORMAT
    model: DiTConfig
    codec: dict[str, Any] = Field(description="`codec.describe()`: build_codec(**codec) rebuilds it")
    text_encoder: dict[str, Any] = Field(description="`text_encoder.describe()`")
    latent_normalisation: LatentNormalisation = Field(default_factory=LatentNormalisation)


def save_exported_model(out_dir: str | Path, model: HybridDiT, *, codec: dict[str, Any],
                        text_encoder: dict[str, Any], latent_normalisation: LatentNormalisation | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the weights (the model's, or `state_dict`, e.g. the EMA) and the config JSON into a local dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = state_dict if state_dict is not None else model.state_dict()
    save_file({name: tensor.detach().contiguous().cpu() for name, tensor in weights.items()}, out / WEIGHTS_FILE)
    config = ExportedModelConfig(model=model.config, codec=codec, text_encoder=text_encoder,
                                 latent_normalisation=latent_normalisation or LatentNormalisation())
    (out / CONFIG_FILE).write_text(json.dumps(config.model_dump(mode="json"), indent=2) + "\n")
    storage.write_complete_marker(out)
    return out


def _marker(source: str) -> dict:
    try:
        return storage.read_complete_marker(source)
    except storage.IncompleteDirectoryError:
        raise storage.StorageNotFoundError(
            f"{source} is not a complete export: it has no {storage.COMPLETE_MARKER} (an export holds "
            f"{CONFIG_FILE}, {WEIGHTS_FILE} and {storage.COMPLETE_MARKER}, written by save_exported_model; "
            "pass a checkpoint's export/ directory or export the model again)"
        ) from None


def _config(source: str, marker: dict) -> ExportedModelConfig:
    try:
        config_json = json.loads(storage.read_published_file(source, CONFIG_FILE, marker))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}/{CONFIG_FILE} is not valid JSON: {exc}") from None
    if config_json.get("format") != FORMAT:
        raise ValueError(f"{source}/{CONFIG_FILE} has format {config_json.get('format')!r}, expected {FORMAT!r}")
    return ExportedModelConfig.model_validate(config_json)


def read_exported_config(source: str | Path) -> ExportedModelConfig:
    """The validated config of an export, verified by its marker, without reading the weights."""
    source = str(source)
    return _config(source, _marker(source))


def read_exported(source: str | Path) -> tuple[dict[str, torch.Tensor], ExportedModelConfig]:
    """The state dict and validated config of an export at `source` (dir or s3:// prefix), verified by its marker."""
    source = str(source)
    marker = _marker(source)
    config = _config(source, marker)
    return load_safetensors_bytes(storage.read_published_file(source, WEIGHTS_FILE, marker)), config


def load_exported_model(source: str | Path, device: str | torch.device = "cpu"
                        ) -> tuple[HybridDiT, ExportedModelConfig]:
    """Rebuild the model from an export, load its weights strictly, and return it in eval mode."""
    state, config = read_exported(source)
    model = HybridDiT(config.model)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), config
