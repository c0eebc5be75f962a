"""The regular files of a tar archive, from a buffer in memory (zero-copy views) or a file stream.

Python's `tarfile` (which WebDataset's `tar_file_iterator` wraps) builds a `TarInfo` per member and
costs ~40 us per file; a cache sample has four or five files, and the train job decodes whole
shards per step on the cores that also run the model. This reader parses the same headers
(POSIX ustar, pax `x` records, GNU long names) straight from the buffer, verifies each header's
checksum, and returns `memoryview`s into the shard instead of copies. The encode job reads
fine-t2i tars through the same parser from a file stream (`TarStream`), member by member.

Archives come from outside, so every header field the parser trusts is range-checked: sizes are
octal digits or GNU base-256 and never negative, pax records are at least as long as their own
length field and end inside their header, metadata payloads are capped, and every step moves
forward by at least one block. Any input therefore ends in time linear in its length, with the
members before the damage and then a `TarFormatError` (the cache's format error).
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from services.cache.schema import CacheFormatError

BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")
_PAX = (b"x", b"g")  # per-member and global extended headers
_GNU_LONG = (b"L", b"K")  # GNU long name and long link name of the next member
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata files, skipped like its reader does
# A pax or GNU long-name payload only ever holds names and numbers; more is not an archive we wrote or read.
MAX_METADATA_BYTES = 1 << 20
# Far beyond any real member, small enough for every seek: bigger sizes are garbage, not data.
MAX_MEMBER_SIZE = 1 << 48
_SKIP_CHUNK = 1 << 20


class TarFormatError(CacheFormatError):
    """A header that is not a tar header (bad checksum, size or record): the rest of the archive is unreadable."""


@dataclass
class TarMembers:
    """Iterates `(name, contents)` of regular files; afterwards `complete` says if the archive ended properly."""

    data: memoryview
    complete: bool = False

    def __iter__(self) -> Iterator[tuple[str, memoryview]]:
        reader = _BufferReader(self.data)
        yield from _walk(reader, max_member_bytes=None)
        self.complete = reader.complete


@dataclass
class TarStream:
    """Iterates `(name, contents)` of regular files read from `stream`; contents is None for members larger
    than `max_member_bytes` (skipped unread). Afterwards `complete` says if the archive ended properly."""

    stream: BinaryIO
    max_member_bytes: int
    complete: bool = False

    def __iter__(self) -> Iterator[tuple[str, bytes | None]]:
        reader = _StreamReader(self.stream)
        yield from _walk(reader, max_member_bytes=self.max_member_bytes)
        self.complete = reader.complete


class _BufferReader:
    def __init__(self, data: memoryview) -> None:
        self.data, self.position, self.complete = data, 0, False

    def read(self, size: int) -> memoryview:
        chunk = self.data[self.position:self.position + size]
        self.position += len(chunk)
        return chunk

    def skip(self, size: int) -> None:
        self.position = min(self.position + size, len(self.data))


class _StreamReader:
    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.complete = stream, False
        self.seekable = stream.seekable()

    def read(self, size: int) -> bytes:
        parts, wanted = [], size
        while wanted > 0:  # raw streams may return less than asked before their end
            part = self.stream.read(wanted)
            if not part:
                break
            parts.append(part)
            wanted -= len(part)
        return b"".join(parts)

    def skip(self, size: int) -> None:
        if self.seekable:  # past the end is allowed: the next read then comes back short
            self.stream.seek(size, io.SEEK_CUR)
            return
        while size > 0 and (chunk := self.stream.read(min(size, _SKIP_CHUNK))):
            size -= len(chunk)


def _walk(
    reader: _BufferReader | _StreamReader, max_member_bytes: int | None
) -> Iterator[tuple[str, memoryview | bytes | None]]:
    """The members of one archive; sets `reader.complete` when two zero blocks end it."""
    offset = 0
    pending: dict[str, str | int] = {}  # pax / GNU long-name records for the next member
    while len(header := reader.read(BLOCK)) == BLOCK:
        if not any(header):
            # Python's tarfile ends archives with two zero blocks; a cut archive lacks them.
            second = reader.read(BLOCK)
            reader.complete = len(second) == BLOCK and not any(second)
            return
        kind, length, name = _parse_header(header, offset)
        if kind not in _PAX and kind not in _GNU_LONG:
            length = int(pending.pop("size", length))
        padded = -(-length // BLOCK) * BLOCK
        contents_at = offset + BLOCK
        offset = contents_at + padded
        if kind in _PAX or kind in _GNU_LONG:
            if length > MAX_METADATA_BYTES:
                raise TarFormatError(
                    f"tar header at byte {contents_at - BLOCK} announces {length} bytes of "
                    f"{'pax' if kind in _PAX else 'GNU long-name'} records (at most {MAX_METADATA_BYTES})")
            payload = reader.read(length)
            if len(payload) < length:
                return
            reader.skip(padded - length)
            if kind == b"x":
                pending.update(_pax_records(payload, contents_at))
            elif kind == b"L":
                pending["path"] = bytes(payload).rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        path = str(pending.pop("path", "")) or name
        pending.clear()
        if kind not in _REGULAR:  # directories, links and devices carry no sample file
            reader.skip(padded)
            continue
        if max_member_bytes is not None and length > max_member_bytes:
            reader.skip(padded)
            contents = None
        else:
            contents = reader.read(length)
            if len(contents) < length:
                return  # truncated inside this member's contents
            reader.skip(padded - length)
        if not _SKIP_META.match(path):
            yield path, contents


def _parse_header(header: memoryview | bytes, offset: int) -> tuple[bytes, int, str]:
    """(type flag, contents size, ustar name) of a checked header block."""
    raw = bytes(header)
    _check_sum(raw, offset)
    size = _number(raw[124:136], "size", offset)
    if size > MAX_MEMBER_SIZE:
        raise TarFormatError(f"tar header at byte {offset} has an impossible size {size}")
    return raw[156:157], size, _ustar_name(raw)


def _check_sum(header: bytes, offset: int) -> None:
    try:
        recorded = _number(header[148:156], "checksum", offset)
    except TarFormatError:
        recorded = -1
    unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")
    # Some old writers summed signed bytes; Python's tarfile accepts both, so do we.
    if recorded != unsigned and recorded != sum(struct.unpack("148b", header[:148])) + sum(
        struct.unpack("356b", header[156:])
    ) + 8 * ord(" "):
        raise TarFormatError(f"no valid tar header at byte {offset} (checksum {recorded} != {unsigned})")


def _number(raw: bytes, field: str, offset: int) -> int:
    """An unsigned header number: octal digits padded with spaces/NULs, or GNU base-256 (0x80 first byte)."""
    if raw[0] == 0x80:  # GNU base-256 for sizes of 8 GiB and more; 0xff would be negative
        return int.from_bytes(raw[1:], "big")
    digits = raw.strip(b" \0")
    if digits.translate(None, b"01234567"):  # `int(, 8)` alone would also take signs, spaces and underscores
        raise TarFormatError(f"tar header at byte {offset} has a {field} that is not octal: {raw!r}")
    return int(digits or b"0", 8)


def _ustar_name(header: bytes) -> str:
    name = header[0:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0":  # POSIX: a prefix holds the leading directories of long names
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _pax_records(payload: memoryview | bytes, offset: int) -> dict[str, str | int]:
    """`"<len> <key>=<value>\\n"` records; only `path` and `size` matter for reading sample files."""
    text = bytes(payload)
    records: dict[str, str | int] = {}
    position = 0
    while position < len(text):
        space = text.find(b" ", position, position + 21)
        digits = text[position:space] if space > position else b""
        length = int(digits) if digits.isdigit() else 0
        end = position + length
        # The shortest record is "<len> k=\n": anything shorter (a zero length would never move on), or
        # running past the payload, is garbage.
        if length < len(digits) + 4 or end > len(text) or text[end - 1] != ord("\n"):
            raise TarFormatError(f"pax record at byte {offset + position} is malformed: {text[position:position + 40]!r}")
        key, equals, value = text[space + 1:end - 1].partition(b"=")
        if not equals:
            raise TarFormatError(f"pax record at byte {offset + position} has no '=': {text[position:end][:40]!r}")
        if key == b"path":
            records["path"] = value.decode("utf-8", "surrogateescape")
        elif key == b"size":
            if not value.isdigit() or int(value) > MAX_MEMBER_SIZE:
                raise TarFormatError(f"pax record at byte {offset + position} has a bad size {value[:40]!r}")
            records["size"] = int(value)
        position = end
    return records
