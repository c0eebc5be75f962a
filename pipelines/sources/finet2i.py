"""fine-t2i WebDataset tars: `<id>.jpg` + `<id>.json` (prompts, scores) + `<id>.txt`, one unit per tar.

Tars come from outside, so one bad member costs one sample: a member over `max_member_bytes`
(skipped unread), a `.json` that is not a JSON object, a repeated file of one sample or a file name
without an extension becomes a sample with that failure reason, and the rest of the tar is encoded.
Damage to the archive itself (compressed, garbled header, cut short) is counted once for the unit,
under a key naming it, after the samples before the damage; the unit still finishes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from typing import IO, Any, Literal

from pydantic import Field, field_validator
from webdataset.tariterators import base_plus_ext

from pipelines.preprocess import SampleRejected, clean_caption
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.listing import expand_uris, unique_unit_names
from services import storage
from services.cache.names import safe_stem
from services.cache.tar_members import TarFormatError, TarStream
from services.config import StrictModel

logger = logging.getLogger(__name__)

CaptionField = Literal["enhanced_prompt", "prompt", "txt"]
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# JSON fields copied into the sample's meta (the prompts themselves become the caption).
META_FIELDS = ("id", "style", "prompt_category", "image_generator", "prompt_generator", "image_resolution")
PROMPT_FIELDS = ("enhanced_prompt", "prompt")
# Magic numbers of the compressions `tarfile`'s "r:*" would silently undo; fine-t2i tars are plain.
COMPRESSION_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd",
                     b"\x04\x22\x4d\x18": "lz4"}
ARCHIVE_KEY_SUFFIX = "__archive"  # the key under which damage to a whole tar is counted


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
    max_member_bytes: int = Field(
        default=64 * 2**20, gt=0, description="larger tar members are skipped unread and their sample counted as "
        "member_too_large (fine-t2i images are at most 2048 px, a few MB)",
    )

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
            compression = _compression(stream)
            if compression is not None:
                yield _archive_failure(unit, "compressed_archive", f"a {compression} file, not a plain tar")
                return
            archive = TarStream(stream, max_member_bytes=self.config.max_member_bytes)
            try:
                for sample in _grouped(archive):
                    yield self._raw_sample(sample, unit)
            except TarFormatError as error:
                yield _archive_failure(unit, "unreadable_archive", str(error))
                return
            if not archive.complete:
                yield _archive_failure(unit, "truncated_archive", "no end-of-archive marker")

    def _raw_sample(self, sample: dict[str, Any], unit: InputUnit) -> RawSample:
        key = safe_stem(sample["__key__"])
        meta: dict[str, Any] = {"source": "finet2i", "shard": unit.uri, "tar_key": sample["__key__"]}
        if "__failure__" in sample:
            return RawSample(key, None, None, meta, failure=sample["__failure__"])
        image_bytes = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image_bytes is None:
            return RawSample(key, None, None, meta, failure="missing_image")
        try:
            record = json.loads(sample["json"]) if "json" in sample else {}
        except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
            return RawSample(key, image_bytes, None, meta, failure="bad_metadata")
        if not isinstance(record, dict) or any(
            record.get(name) is not None and not isinstance(record[name], str) for name in PROMPT_FIELDS
        ):
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


def _compression(stream: IO[bytes]) -> str | None:
    """The compression `stream` starts with, if any (the stream is left at its start)."""
    head = stream.read(6)
    stream.seek(0)
    return next((name for magic, name in COMPRESSION_MAGIC.items() if head.startswith(magic)), None)


def _archive_failure(unit: InputUnit, reason: str, detail: str) -> RawSample:
    logger.warning("%s (unit %s): %s: %s; the samples before it were kept", unit.uri, unit.name, reason, detail)
    meta = {"source": "finet2i", "shard": unit.uri, "detail": detail[:300]}
    return RawSample(f"{unit.name}{ARCHIVE_KEY_SUFFIX}", None, None, meta, failure=reason)


def _grouped(members: Iterable[tuple[str, bytes | None]]) -> Iterator[dict[str, Any]]:
    """WebDataset's grouping of consecutive `<key>.<ext>` files, with a failure reason instead of an exception
    for a sample whose file repeats, is over the size cap (contents None), or has no usable name."""
    sample: dict[str, Any] | None = None
    try:
        for name, contents in members:
            key, extension = base_plus_ext(name)
            printable = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
            if key is None or printable != name:  # no extension, or not UTF-8: no usable sample key
                yield {"__key__": printable or "unnamed", "__failure__": "bad_member_name"}
                continue
            extension = extension.lower()
            if sample is None or key != sample["__key__"]:
                if sample is not None:
                    yield sample
                sample = {"__key__": key}
            if extension in sample:
                sample["__failure__"] = "duplicate_member"
            elif contents is None:
                sample["__failure__"] = "member_too_large"
            sample[extension] = contents
    except TarFormatError:  # the files read whole before the damage still make a sample
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample
