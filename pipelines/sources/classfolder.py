"""ImageNet-style class folders `root/<label>/*.jpg`, captioned from a template ("a photo of a {label}")."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from pydantic import Field, field_validator

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


class ClassFolderConfig(StrictModel):
    """The class folders, the caption template and optional readable names for folder labels."""

    kind: Literal["classfolder"] = "classfolder"
    root: str = Field(description="local path, file:// or s3:// prefix holding one folder per class")
    caption_template: str = "a photo of a {label}"
    label_names: dict[str, str] = Field(
        default_factory=dict, description="folder name -> name used in captions"
    )
    files_per_unit: int | None = Field(
        default=None, ge=1, description="split big classes; unset: one unit per class"
    )

    @field_validator("caption_template")
    @classmethod
    def _template_uses_only_label(cls, template: str) -> str:
        try:
            filled = template.format(label="\0")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"caption_template {template!r} may only use the field {{label}}: {exc}"
            ) from None
        if "\0" not in filled:
            raise ValueError(f"caption_template {template!r} must contain {{label}}")
        return template


class ClassFolderSource:
    """One unit per class folder (or per chunk of it); class indices follow the sorted folder names."""

    def __init__(self, config: ClassFolderConfig) -> None:
        self.config = config

    def list_units(self) -> list[InputUnit]:
        root = absolute_uri(self.config.root)
        by_label: dict[str, list[str]] = {}
        for relative in list_relative_files(root, IMAGE_SUFFIXES):
            label, _, rest = relative.partition("/")
            if rest:  # files lying directly in root belong to no class
                by_label.setdefault(label, []).append(relative)
        units = []
        for class_index, label in enumerate(sorted(by_label)):
            files = by_label[label]
            size = self.config.files_per_unit or len(files)
            for chunk_index, chunk in enumerate(chunks(files, size)):
                name = safe_stem(
                    label if self.config.files_per_unit is None else f"{label}__chunk-{chunk_index:05d}"
                )
                options = {"label": label, "class_index": class_index, "files": chunk}
                units.append(InputUnit(name, "classfolder", root, options))
        return units

    def iter_samples(self, unit: InputUnit) -> Iterator[RawSample]:
        label = unit.options["label"]
        caption = self.config.caption_template.format(label=self.config.label_names.get(label, label))
        for relative in unit.options["files"]:
            meta = {
                "source": "classfolder",
                "path": join_relative(unit.uri, relative),
                "label": label,
                "class_index": unit.options["class_index"],
            }
            yield RawSample(
                key_from_relative(relative),
                storage.read_bytes(join_relative(unit.uri, relative)),
                caption,
                meta,
            )
