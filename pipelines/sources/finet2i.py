"""fine-t2i WebDataset tars: `<id>.jpg` + `<id>.json` (prompts, scores) + `<id>.txt`, one unit per tar."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, field_validator
from webdataset.tariterators import group_by_keys, tar_file_iterator

from pipelines.preprocess import SampleRejected, clean_caption
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.listing import expand_uris, unique_unit_names
from services import storage
from services.cache.names import safe_stem
from services.config import StrictModel

CaptionField = Literal["enhanced_prompt", "prompt", "txt"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# JSON fields copied into the sample's meta (the prompts themselves become the caption).
META_FIELDS = ("id", "style", "prompt_category", "image_generator", "prompt_generator", "image_resolution")


class FineT2IConfig(StrictModel):
    """Where the tars are and which caption each sample gets."""

    kind: Literal["finet2i"] = "finet2i"
    uris: list[str] = Field(
        min_length=1, description="tar URIs, `train-{000000..000009}.tar` ranges, globs or prefixes"
    )
    caption_field: Literal["enhanced_prompt", "prompt", "txt", "mix"] = "enhanced_prompt"
    mix_weights: dict[CaptionField, float] = Field(
        default_factory=lambda: {"enhanced_prompt": 1.0, "prompt": 1.0, "txt": 1.0},
        description="relative odds of each caption field when caption_field is 'mix'",
    )
    mix_seed: int = Field(default=0, description="changes which caption 'mix' picks per key, reproducibly")

    @field_validator("mix_weights")
    @classmethod
    def _weights_are_odds(cls, weights: dict[str, float]) -> dict[str, float]:
        if any(weight < 0 for weight in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError(f"mix_weights {weights} must be >= 0 with a positive sum")
        return weights


def mixed_caption_field(key: str, available: list[str], weights: dict[str, float], seed: int) -> str | None:
    """The caption field for `key`, drawn from `available` with `weights`, the same on every run."""
    candidates = [name for name in available if weights.get(name, 0) > 0]
    if not candidates:
        return None
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64 * sum(weights[name] for name in candidates)
    for name in candidates:
        point -= weights[name]
        if point < 0:
            return name
    return candidates[-1]


class FineT2ISource:
    """Streams fine-t2i tars member by member (never a whole tar in memory)."""

    def __init__(self, config: FineT2IConfig) -> None:
        self.config = config

    def list_units(self) -> list[InputUnit]:
        uris = expand_uris(self.config.uris, ".tar")
        names = unique_unit_names(uris)
        return [InputUnit(name=names[uri], source="finet2i", uri=uri) for uri in uris]

    def iter_samples(self, unit: InputUnit) -> Iterator[RawSample]:
        with storage.open_uri(unit.uri, "rb") as stream:
            members = ({**member, "__url__": unit.uri} for member in tar_file_iterator(stream))
            for sample in group_by_keys(members):
                yield self._raw_sample(sample, unit)

    def _raw_sample(self, sample: dict[str, Any], unit: InputUnit) -> RawSample:
        key = safe_stem(sample["__key__"])
        meta: dict[str, Any] = {"source": "finet2i", "shard": unit.uri, "tar_key": sample["__key__"]}
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_bytes is None:
            return RawSample(key, None, None, meta, failure="missing_image")
        try:
            record = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            return RawSample(key, image_bytes, None, meta, failure="bad_metadata")
        meta.update({name: record[name] for name in META_FIELDS if name in record})
        if "aesthetic_predictor_v_2_5_score" in record:
            meta["aesthetic_score"] = record["aesthetic_predictor_v_2_5_score"]
        texts = {
            "enhanced_prompt": record.get("enhanced_prompt"),
            "prompt": record.get("prompt"),
            "txt": sample.get("txt"),
        }
        field = self._caption_field(key, texts)
        meta["caption_field"] = field
        try:
            caption = clean_caption(texts.get(field) if field else None)
        except SampleRejected as rejected:
            return RawSample(key, image_bytes, None, meta, failure=rejected.reason)
        return RawSample(key, image_bytes, caption, meta)

    def _caption_field(self, key: str, texts: dict[str, str | bytes | None]) -> str | None:
        if self.config.caption_field != "mix":
            return self.config.caption_field
        available = [name for name, text in texts.items() if text and text.strip()]
        return mixed_caption_field(key, available, self.config.mix_weights, self.config.mix_seed)
