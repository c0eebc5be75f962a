"""Input corpora of the encode job behind one interface: `build_source(config)` -> units -> raw samples."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pipelines.sources.base import InputUnit, RawSample, Source, select_units
from pipelines.sources.classfolder import ClassFolderConfig, ClassFolderSource
from pipelines.sources.finet2i import FineT2IConfig, FineT2ISource
from pipelines.sources.folder import FolderConfig, FolderSource
from pipelines.sources.laion import LaionConfig, LaionSource

SourceConfig = Annotated[
    FineT2IConfig | LaionConfig | FolderConfig | ClassFolderConfig, Field(discriminator="kind")
]

_SOURCES = {
    FineT2IConfig: FineT2ISource,
    LaionConfig: LaionSource,
    FolderConfig: FolderSource,
    ClassFolderConfig: ClassFolderSource,
}


def build_source(config: SourceConfig) -> Source:
    """The source a validated config describes."""
    return _SOURCES[type(config)](config)


__all__ = [
    "ClassFolderConfig",
    "FineT2IConfig",
    "FolderConfig",
    "InputUnit",
    "LaionConfig",
    "RawSample",
    "Source",
    "SourceConfig",
    "build_source",
    "select_units",
]
