"""What every source hands the encode job: input units to schedule and raw samples to preprocess."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class InputUnit:
    """One schedulable piece of a corpus (a tar, a parquet row group, a chunk of files).

    `name` is stable across runs and safe as a file stem: output shards and progress records are
    named after it, so re-running a unit overwrites its own outputs.
    """

    name: str
    source: str
    uri: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RawSample:
    """An image and caption as the source delivered them, or the reason they could not be obtained."""

    key: str
    image_bytes: bytes | None
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict)
    failure: str | None = None


class Source(Protocol):
    """A corpus split into input units, each yielding its samples in a deterministic order."""

    def list_units(self) -> list[InputUnit]: ...

    def iter_samples(self, unit: InputUnit) -> Iterator[RawSample]: ...


def select_units(
    units: list[InputUnit],
    *,
    include: list[str] | None = None,
    shard_index: int = 0,
    num_shards: int = 1,
    limit_units: int | None = None,
) -> list[InputUnit]:
    """The units one job (or one of `num_shards` jobs) processes: filter by name, stride, then cap."""
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index={shard_index} must lie in [0, num_shards={num_shards})")
    if limit_units is not None and limit_units < 0:
        raise ValueError(f"limit_units={limit_units} must be >= 0")
    selected = units
    if include is not None:
        unmatched = [
            pattern for pattern in include if not any(fnmatch.fnmatchcase(u.name, pattern) for u in units)
        ]
        if unmatched:
            raise ValueError(
                f"include patterns {unmatched} match no unit (units look like {units[0].name!r})"
                if units
                else f"include patterns {unmatched} given but the source has no units"
            )
        selected = [u for u in units if any(fnmatch.fnmatchcase(u.name, pattern) for pattern in include)]
    selected = selected[shard_index::num_shards]
    return selected if limit_units is None else selected[:limit_units]
