"""The regular files of a tar archive held in memory, as zero-copy views.

Python's `tarfile` (which WebDataset's `tar_file_iterator` wraps) builds a `TarInfo` per member and
costs ~40 us per file; a cache sample has four or five files, and the train job decodes whole
shards per step on the cores that also run the model. This reader parses the same headers
(POSIX ustar, pax `x` records, GNU long names) straight from the buffer, verifies each header's
checksum, and returns `memoryview`s into the shard instead of copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

BLOCK = 512
_END_OF_ARCHIVE = bytes(2 * BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata files, skipped like its reader does


class TarFormatError(ValueError):
    """A header that is not a tar header (bad checksum or size): the rest of the archive is unreadable."""


@dataclass
class TarMembers:
    """Iterates `(name, contents)` of regular files; afterwards `complete` says if the archive ended properly."""

    data: memoryview
    complete: bool = False

    def __iter__(self) -> Iterator[tuple[str, memoryview]]:
        data, offset, size = self.data, 0, len(self.data)
        pending: dict[str, str] = {}  # pax / GNU long-name records for the next member
        while offset + BLOCK <= size:
            header = data[offset:offset + BLOCK]
            if not any(header):
                # Python's tarfile pads archives with zero blocks; a cut archive lacks the two at its end.
                self.complete = size % BLOCK == 0 and data[size - 2 * BLOCK:] == _END_OF_ARCHIVE
                return
            _check_sum(header, offset)
            length = _number(header[124:136], offset)
            start = offset + BLOCK
            end = start + length
            if end > size:
                return  # truncated inside this member's contents
            offset = start + -(-length // BLOCK) * BLOCK
            kind = bytes(header[156:157])
            if kind == b"x":
                pending.update(_pax_records(data[start:end]))
            elif kind == b"L":
                pending["path"] = bytes(data[start:end]).rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind in _REGULAR:
                name = pending.pop("path", None) or _ustar_name(header)
                pending.clear()
                if not _SKIP_META.match(name):
                    yield name, data[start:end]
            elif kind != b"g":
                pending.clear()  # directories, links and devices carry no sample file


def _check_sum(header: memoryview, offset: int) -> None:
    stored = header[148:156]
    expected = sum(bytes(header)) - sum(bytes(stored)) + 8 * ord(" ")
    try:
        recorded = int(bytes(stored).rstrip(b"\0 ").strip() or b"-1", 8)
    except ValueError:
        recorded = -1
    if recorded != expected:
        raise TarFormatError(f"no valid tar header at byte {offset} (checksum {recorded} != {expected})")


def _number(field: memoryview, offset: int) -> int:
    raw = bytes(field)
    if raw[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(raw[1:], "big")
    try:
        return int(raw.rstrip(b"\0 ").strip() or b"0", 8)
    except ValueError as error:
        raise TarFormatError(f"tar header at byte {offset} has a size that is not octal: {raw!r}") from error


def _ustar_name(header: memoryview) -> str:
    name = bytes(header[0:100]).split(b"\0", 1)[0]
    if bytes(header[257:263]) == b"ustar\0":  # POSIX: a prefix holds the leading directories of long names
        prefix = bytes(header[345:500]).split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: memoryview) -> dict[str, str]:
    """`"<len> <key>=<value>\\n"` records; only `path` matters for naming sample files."""
    records = {}
    text = bytes(payload)
    position = 0
    while position < len(text):
        space = text.index(b" ", position)
        length = int(text[position:space])
        key, _, value = text[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        position += length
    return {"path": records["path"]} if "path" in records else {}
