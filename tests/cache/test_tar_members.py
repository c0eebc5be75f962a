"""The in-memory tar reader agrees with Python's tarfile on every header kind the cache can meet."""

from __future__ import annotations

import io
import tarfile

import pytest

from services.cache.tar_members import TarFormatError, TarMembers


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
