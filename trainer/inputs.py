"""What a run trains on: the cache, resolved once on the driver, and the model and teacher checked against it."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from services import storage
from services.cache import layout, manifest, reader
from trainer.config import TrainJobConfig
from trainer.data import ShardEntry, index_shards, select_buckets, split_holdout, steps_per_epoch
from trainer.export import ExportedModelConfig, LatentNormalisation
from trainer.models import DiTConfig, build_model, resolve_config

logger = logging.getLogger(__name__)


@dataclass
class ResolvedCache:
    """What the driver resolves once and hands every rank: shard index, null text and the cache's encoders."""

    train_shards: list[ShardEntry]
    validation_shards: list[ShardEntry]
    null_text: np.ndarray | None
    codec: dict[str, Any] = field(default_factory=dict)
    text_encoder: dict[str, Any] = field(default_factory=dict)
    latent_normalisation: LatentNormalisation | None = None
    pixels: bool = False  # the samples carry their preprocessed pixels (the manifest says so)


def _first_cache_root(uris: list[str]) -> str | None:
    return next((uri for uri in uris if not uri.endswith(".tar") and storage.exists(layout.manifest_uri(uri))), None)


def resolve_cache(config: TrainJobConfig) -> ResolvedCache:
    """Index the training and validation shards and load the null text (reads manifests, not shards)."""
    data = config.data
    shards = select_buckets(index_shards(data.uris, fail_on_corrupt=data.fail_on_corrupt), data.buckets)
    validation_shards: list[ShardEntry] = []
    if config.validation.holdout_shards:
        shards, validation_shards = split_holdout(shards, config.validation.holdout_shards)
    if config.validation.uris:
        validation_shards += select_buckets(index_shards(config.validation.uris), data.buckets)
    root = _first_cache_root(data.uris)
    card = manifest.read_manifest(root) if root is not None else None
    null_text_uri = data.null_text_uri or (layout.null_text_uri(root) if root is not None else None)
    null_text = reader.load_null_text(null_text_uri) if null_text_uri is not None else None
    if null_text is None and config.cfg_dropout > 0:
        raise ValueError(
            f"cfg_dropout={config.cfg_dropout} needs the null text: this cache has no {layout.NULL_TEXT}; "
            "set data.null_text_uri to the encoder's (L, D) .npy for the empty prompt, or cfg_dropout=0"
        )
    return ResolvedCache(shards, validation_shards, null_text,
                         codec=card.codec if card else {}, text_encoder=card.text_encoder if card else {},
                         latent_normalisation=LatentNormalisation(scale=card.latent_scale, shift=card.latent_shift)
                         if card else None,
                         pixels=card.pixels if card else False)


def total_steps(config: TrainJobConfig, cache: ResolvedCache) -> int:
    if config.max_steps is not None:
        return config.max_steps
    return config.epochs * steps_per_epoch(
        cache.train_shards, world_size=config.scaling.num_workers, batch_per_rank=config.batch_per_rank,
        seed=config.seed, window_shards=config.data.shuffle_window_shards)


def _set_pixel_branch(config: TrainJobConfig, cache: ResolvedCache, model: nn.Module) -> None:
    """Hi-DiT: stage 2 (`pixel_branch`) needs a model with a pixel stream and a cache with pixels; in stage 1 the
    pixel stream is frozen, so DDP and AdamW leave it alone and stage 2 finds it as initialised."""
    stream = getattr(model, "pixel_stream", None)
    if config.pixel_branch is None:
        if stream is not None:
            stream.requires_grad_(False)
            logger.info("Hi-DiT stage 1: the pixel stream is frozen (set pixel_branch to train it)")
        return
    if stream is None:
        raise ValueError(f"pixel_branch is set but model {config.model.preset} has no pixel stream: pick a HiDiT "
                         "preset or model.overrides.pixel_stream=true")
    if not cache.pixels:
        raise ValueError(f"pixel_branch needs a cache with pixels, and the manifest of {config.data.uris} says it has "
                         "none: encode it with output.store_pixels=true")


def _check_repa(config: TrainJobConfig, cache: ResolvedCache, model_config: DiTConfig) -> None:
    if config.repa is None:
        if model_config.repa_depth is not None:
            raise ValueError(f"model {config.model.preset} has a REPA projector (repa_depth={model_config.repa_depth}) "
                             "that this run would not train: set repa, or model.overrides.repa_depth=null")
        return
    if model_config.repa_depth is None:
        raise ValueError(f"repa is set but model {config.model.preset} has no REPA projector: set "
                         "model.overrides.repa_depth (and repa_dim, the encoder's feature width)")
    if not cache.pixels:
        raise ValueError(f"repa needs a cache with pixels, and the manifest of {config.data.uris} says it has none: "
                         "encode it with output.store_pixels=true")


def build_job_model(config: TrainJobConfig, cache: ResolvedCache) -> nn.Module:
    """The configured DiT, checked against the cache's latent channels and text width, and initialised from
    `init_from` when set (LiT weight inheritance)."""
    model_config = resolve_config(config.model.preset)
    if config.model.overrides:
        model_config = type(model_config).model_validate({**model_config.model_dump(), **config.model.overrides})
    channels = {shard.latent_channels for shard in cache.train_shards}
    if channels != {model_config.latent_channels}:
        raise ValueError(f"model {config.model.preset} takes {model_config.latent_channels} latent channels; "
                         f"the cache holds {sorted(channels)}: pick a preset or model.overrides that match")
    if cache.null_text is not None and cache.null_text.shape[1] != model_config.text_dim:
        raise ValueError(f"model {config.model.preset} takes text_dim={model_config.text_dim}; the cache's text "
                         f"encoder gives {cache.null_text.shape[1]}: set model.overrides.text_dim")
    model = build_model(model_config)
    _set_pixel_branch(config, cache, model)
    _check_repa(config, cache, model_config)
    if config.init_from is not None:
        from trainer.checkpoint import resolve_export
        from trainer.export import read_exported
        from trainer.inheritance import inherit_weights

        export_uri, _ = resolve_export(config.init_from)
        logger.info("init_from: inheriting the weights of %s", export_uri)
        inherit_weights(model, read_exported(export_uri)[0])  # logs what it took and what it left fresh
    return model


def check_teacher_matches_cache(exported: ExportedModelConfig, cache: ResolvedCache, where: str) -> None:
    """Refuse a teacher trained on other latents or text: its velocities would be targets for inputs it never saw."""
    pairs = (("codec", exported.codec, cache.codec),
             ("text encoder", exported.text_encoder, cache.text_encoder),
             ("latent normalisation", exported.latent_normalisation.model_dump(),
              (cache.latent_normalisation or LatentNormalisation()).model_dump()))
    for what, teacher_value, cache_value in pairs:
        if teacher_value != cache_value:
            raise ValueError(f"teacher {where} was trained with {what} {teacher_value}, but this run's cache has "
                             f"{cache_value}: distil from a teacher trained on this cache's encoders, or encode the "
                             "cache with the teacher's")


def check_teacher(config: TrainJobConfig, cache: ResolvedCache) -> str:
    """On the driver, before any worker starts: the teacher's export exists, verifies and matches the cache;
    returns its URI."""
    from trainer.checkpoint import resolve_export
    from trainer.export import read_exported_config

    export_uri, _ = resolve_export(config.teacher)
    check_teacher_matches_cache(read_exported_config(export_uri), cache, export_uri)
    return export_uri


def load_teacher(config: TrainJobConfig, cache: ResolvedCache, device: torch.device | str = "cpu") -> nn.Module:
    """The frozen teacher of `config.teacher`, rebuilt from its export's own model config, checked against the cache."""
    from trainer.checkpoint import resolve_export
    from trainer.export import load_exported_model

    export_uri, _ = resolve_export(config.teacher)
    teacher, exported = load_exported_model(export_uri, device)
    check_teacher_matches_cache(exported, cache, export_uri)
    teacher.requires_grad_(False)
    logger.info("teacher: %s, %d blocks with softmax and %d with linear self-attention", export_uri,
                len(exported.model.full_attention_blocks),
                exported.model.depth - len(exported.model.full_attention_blocks))
    return teacher
