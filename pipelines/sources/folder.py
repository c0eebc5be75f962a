"""A local or S3 folder of `image.(jpg|jpeg|png|webp)` files with same-stem `.txt` captions (and `.json`)."""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from pipelines.preprocess import SampleRejected, clean_caption
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.listing import (
    IMAGE_SUFFIXES,
    absolute_uri,
    chunks,
    join_relative,
    key_from_relative,
    list_relative_files,
)
from services import storage
from services.cache.names import safe_stem
from services.config import StrictModel


class FolderConfig(StrictModel):
    """The folder and how many images make one unit."""

    kind: Literal["folder"] = "folder"
    root: str = Field(description="local path, file:// or s3:// prefix; searched recursively")
    files_per_unit: int = Field(default=1000, ge=1)


class FolderSource:
    """Image files paired with captions by stem, in sorted path order, chunked into units."""

    def __init__(self, config: FolderConfig) -> None:
        self.config = config

    def list_units(self) -> list[InputUnit]:
        root = absolute_uri(self.config.root)
        files = list_relative_files(root, (*IMAGE_SUFFIXES, ".txt", ".json"))
        present = set(files)
        items: list[list[str | None]] = []
        owners: dict[str, str] = {}
        for relative in files:
            stem, suffix = posixpath.splitext(relative)
            if suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if stem in owners:
                raise ValueError(
                    f"{join_relative(root, owners[stem])} and {join_relative(root, relative)} share "
                    f"the caption {stem}.txt: keep one image per stem"
                )
            owners[stem] = relative
            items.append(
                [
                    relative,
                    *(f"{stem}{ext}" if f"{stem}{ext}" in present else None for ext in (".txt", ".json")),
                ]
            )
        prefix = safe_stem(posixpath.basename(root.rstrip("/")) or "folder")
        return [
            InputUnit(f"{prefix}__chunk-{index:05d}", "folder", root, {"items": chunk})
            for index, chunk in enumerate(chunks(items, self.config.files_per_unit))
        ]

    def iter_samples(self, unit: InputUnit) -> Iterator[RawSample]:
        for image_path, caption_path, meta_path in unit.options["items"]:
            key = key_from_relative(image_path)
            meta = {"source": "folder", "path": join_relative(unit.uri, image_path)}
            try:
                caption = clean_caption(
                    storage.read_bytes(join_relative(unit.uri, caption_path)) if caption_path else None
                )
            except SampleRejected as rejected:
                yield RawSample(key, None, None, meta, failure=rejected.reason)
                continue
            if meta_path:
                try:
                    meta["source_meta"] = json.loads(storage.read_bytes(join_relative(unit.uri, meta_path)))
                except ValueError:
                    yield RawSample(key, None, caption, meta, failure="bad_metadata")
                    continue
            yield RawSample(key, storage.read_bytes(join_relative(unit.uri, image_path)), caption, meta)
