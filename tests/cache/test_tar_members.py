"""The tar reader agrees with Python's tarfile on every header kind the cache can meet, and ends on hostile ones."""

from __future__ import annotations

import io
import tarfile

import pytest

from services.cache.tar_members import TarFormatError, TarMembers, TarStream
from tests.fixtures.tar_mutations import pax_header, seal


def build_tar(files: dict[str, bytes], *, fmt: int = tarfile.PAX_FORMAT, directory: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        if directory is not None:
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read(data: bytes) -> tuple[list[tuple[str, bytes]], bool]:
    members = TarMembers(memoryview(data))
    return [(name, bytes(contents)) for name, contents in members], members.complete


FILES = {
    "key0.latent.npy": b"\x93NUMPY" + bytes(range(200)),
    "key0.caption.txt": "caf\u00e9".encode(),
    "key1.meta.json": b"{}",
    "key1.empty.bin": b"",
    "k" * 150 + ".txt": b"long name",  # > 100 characters: a pax path record (PAX) or ././@LongLink (GNU)
    "dir/" * 30 + "deep.txt": b"long path",  # a ustar prefix where it fits, else pax / GNU
    "exact.bin": bytes(1024),  # contents a multiple of the block size
}


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_and_contents_match_tarfile(fmt):
    files = FILES if fmt != tarfile.USTAR_FORMAT else {k: v for k, v in FILES.items() if len(k) < 100}
    data = build_tar(files, fmt=fmt, directory="dir/")
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        expected = [(m.name, archive.extractfile(m).read()) for m in archive if m.isreg()]
    members, complete = read(data)
    assert members == expected
    assert [name for name, _ in members] == list(files)
    assert complete


def test_webdataset_metadata_files_are_skipped():
    members, _ = read(build_tar({"__meta__": b"x", "a.txt": b"1"}))
    assert members == [("a.txt", b"1")]


def test_a_cut_archive_yields_the_whole_members_before_the_cut_and_is_not_complete():
    data = build_tar({"a.txt": b"1" * 700, "b.txt": b"2" * 700})
    cut = data[: 512 + 1024 + 512 + 100]  # a's header and contents, b's header, part of b
    members, complete = read(cut)
    assert members == [("a.txt", b"1" * 700)]
    assert not complete
    members, complete = read(data[: 2 * (512 + 1024)])  # every member, but no end-of-archive blocks
    assert [name for name, _ in members] == ["a.txt", "b.txt"] and not complete


def test_a_garbled_header_raises_after_the_members_before_it():
    data = bytearray(build_tar({"a.txt": b"1", "b.txt": b"2"}))
    data[1024 + 10] ^= 0xFF  # inside b's header name: its checksum no longer matches
    members = iter(TarMembers(memoryview(bytes(data))))
    assert next(members) == ("a.txt", memoryview(b"1"))
    with pytest.raises(TarFormatError, match="byte 1024"):
        next(members)


def test_random_bytes_are_not_a_tar():
    with pytest.raises(TarFormatError, match="byte 0"):
        read(bytes(range(256)) * 4)


# --------------------------------------------------------------------------- hostile headers end in bounded time


def with_header_field(data: bytes, header: int, start: int, value: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[header + start:header + start + len(value)] = value
    seal(damaged, header)  # a valid checksum: the parser must judge the field itself
    return bytes(damaged)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("size", [b"-0000001000\0", b"-1\0\0\0\0\0\0\0\0\0\0", b" +0000001000", b"0_000001000\0",
                                  b"\xff" * 12], ids=["negative", "minus-one", "plus-sign", "underscore", "base256-neg"])
def test_a_size_that_is_not_unsigned_octal_raises_the_format_error(size):
    data = build_tar({"a.txt": b"1", "b.txt": b"2"})
    with pytest.raises(TarFormatError, match="byte 1024"):
        read(with_header_field(data, 1024, 124, size))


@pytest.mark.timeout(10)
def test_a_base256_size_past_the_archive_end_is_a_truncated_archive_not_a_hang():
    data = build_tar({"a.txt": b"1", "b.txt": b"2"})
    members, complete = read(with_header_field(data, 1024, 124, b"\x80" + (2**40).to_bytes(11, "big")))
    assert members == [("a.txt", b"1")] and not complete
    with pytest.raises(TarFormatError, match="impossible size"):
        read(with_header_field(data, 1024, 124, b"\x80" + (2**80).to_bytes(11, "big")))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("record", [b"0 path=x\n", b"00 path=x\n", b"3 path=x\n", b"99 path=x\n", b"5 path\n",
                                    b"12 size=-100\n", b"path=x\n"],
                         ids=["zero-length", "zero-padded-zero", "shorter-than-its-field", "past-the-payload",
                              "no-equals", "negative-size", "no-length"])
def test_a_malformed_pax_record_raises_the_format_error(record):
    data = build_tar({"a.txt": b"1", "b.txt": b"2"})
    with pytest.raises(TarFormatError, match="pax record"):
        read(data[:1024] + pax_header([record]) + data[1024:])


def test_a_pax_size_record_overrides_the_header_size():
    data = build_tar({"a.txt": b"1", "b.txt": b"22"})
    # b's header says 2 bytes; a pax record says 1: the reader follows the pax record, as tarfile does.
    members, complete = read(data[:1024] + pax_header([b"10 size=1\n"]) + data[1024:])
    assert members == [("a.txt", b"1"), ("b.txt", b"2")] and complete


@pytest.mark.parametrize("seekable", [True, False], ids=["seekable", "pipe"])
def test_a_stream_yields_the_same_members_and_skips_those_over_the_cap_unread(seekable):
    data = build_tar(FILES, directory="dir/")

    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return seekable

    archive = TarStream(Pipe(data), max_member_bytes=300)
    members = [(name, None if contents is None else bytes(contents)) for name, contents in archive]
    assert members == [(name, contents if len(contents) <= 300 else None) for name, contents in FILES.items()]
    assert archive.complete


@pytest.mark.timeout(10)
def test_a_pax_record_without_a_length_after_a_good_one_raises_instead_of_looping():
    # Found by the fuzz test: after a well-formed record the next one has no "<len> " prefix at all.
    data = build_tar({"a.txt": b"1", "b.txt": b"2"})
    with pytest.raises(TarFormatError, match="pax record"):
        read(data[:1024] + pax_header([b"10 path=x\n", b"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n"]) + data[1024:])
