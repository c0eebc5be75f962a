"""The bad-input corpus: every way an input can be broken or hostile, per source and for the cache reader,
in one table with the reason it must be counted under. One bad sample costs one sample: each source's
cases sit in one unit next to good samples, and the good samples still come out.

Builders below make each case from real inputs (photos, real tars, a loopback HTTP server, cache shards
written by the cache writer) under the case's name; the tests compare the reasons observed per name
with the table.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections import Counter

import pytest
from pydantic import ValidationError

from pipelines.demo.synthetic_cache import write_tiny_cache
from pipelines.preprocess import PreprocessConfig
from pipelines.sources import FineT2IConfig, FolderConfig, LaionConfig, build_source
from pipelines.sources.finet2i import ARCHIVE_KEY_SUFFIX
from services.cache import reader
from services.cache.schema import CacheFormatError, decode_sample
from tests.fixtures.corpora import (
    LAION_FETCH_SETTINGS,
    PHOTOS_BY_NAME,
    LoopbackImageServer,
    encode,
    finet2i_records,
    make_bad_input_corpus,
    make_laion_parquet,
    photo_pixels,
    reasons_by_key,
)
from tests.fixtures.tar_mutations import pax_header, seal

PREPROCESS = PreprocessConfig(resolution=64, multiple_of=32)
FINET2I_MEMBER_CAP = 200_000  # above every photo used here; `huge.jpg` is above it

# (source, case, expected reason); the case is the sample key (fine-t2i tars: the tar for archive damage).
BAD_INPUTS: list[tuple[str, str, str]] = [
    # local folders (image + .txt caption)
    ("folder", "empty", "empty_file"),
    ("folder", "truncated", "truncated"),
    ("folder", "not_an_image", "decode_error"),
    ("folder", "one_pixel", "too_small"),
    ("folder", "bomb", "decompression_bomb"),
    ("folder", "latin1_caption", "bad_caption_encoding"),
    ("folder", "no_caption", "missing_caption"),
    ("folder", "blank_caption", "missing_caption"),
    ("folder", "gif_named_png", "unsupported_format"),
    # fine-t2i tars: bad members cost their sample
    ("finet2i", "json_array", "bad_metadata"),
    ("finet2i", "json_invalid", "bad_metadata"),
    ("finet2i", "json_nested_deep", "bad_metadata"),
    ("finet2i", "prompt_not_text", "bad_metadata"),
    ("finet2i", "huge", "member_too_large"),
    ("finet2i", "twice", "duplicate_member"),
    ("finet2i", "no_image", "missing_image"),
    ("finet2i", "README", "bad_member_name"),
    ("finet2i", "html_as_jpg", "decode_error"),
    ("finet2i", "gif_as_jpg", "unsupported_format"),
    ("finet2i", "empty_prompt", "missing_caption"),
    # fine-t2i tars: damage to the archive is counted once for the unit, after the samples before it
    ("finet2i", "gzipped", "compressed_archive"),
    ("finet2i", "cut_short", "truncated_archive"),
    ("finet2i", "garbled_header", "unreadable_archive"),
    ("finet2i", "negative_size", "unreadable_archive"),
    ("finet2i", "zero_length_pax_record", "unreadable_archive"),
    # LAION parquet + HTTP
    ("laion", "deleted", "http_404"),
    ("laion", "forbidden", "http_403"),
    ("laion", "slow_answer", "timeout"),
    ("laion", "half_body", "truncated_body"),
    ("laion", "html_page", "decode_error"),
    ("laion", "huge_body", "too_large"),
    ("laion", "no_caption", "missing_caption"),
    ("laion", "no_url", "missing_url"),
    ("laion", "redirect_loop", "too_many_redirects"),
    ("laion", "redirect_chain_too_long", "too_many_redirects"),
    ("laion", "redirect_to_loopback", "blocked_loopback"),
    ("laion", "redirect_to_metadata_service", "blocked_link_local"),
    ("laion", "loopback_ipv6", "blocked_loopback"),
    ("laion", "mapped_loopback", "blocked_loopback"),
    ("laion", "private_network", "blocked_private"),
    ("laion", "metadata_service", "blocked_link_local"),
    ("laion", "multicast", "blocked_multicast"),
    ("laion", "file_scheme", "blocked_scheme"),
    ("laion", "ftp_scheme", "blocked_scheme"),
    ("laion", "unclosed_ipv6_host", "invalid_url"),
    ("laion", "too_many_headers", "bad_response"),
    ("laion", "header_line_too_long", "bad_response"),
    ("laion", "invalid_status_line", "bad_response"),
    ("laion", "trickled_body", "too_slow"),
    ("laion", "gzip_encoded_body", "compressed_body"),
    ("laion", "gif", "unsupported_format"),
    # latent-cache shards, as the train job reads them
    ("cache", "negative_size", "unreadable_shard"),
    ("cache", "zero_length_pax_record", "unreadable_shard"),
    ("cache", "huge_base256_size", "unreadable_shard"),
    ("cache", "random_bytes", "unreadable_shard"),
    ("cache", "cut_short", "truncated_shard"),
    ("cache", "missing", "missing_shard"),
    ("cache", "sample_without_text", "corrupt_sample"),
    ("cache", "meta_not_an_object", "corrupt_sample"),
]


def expected(source: str) -> dict[str, str]:
    return {case: reason for kind, case, reason in BAD_INPUTS if kind == source}


def test_the_bad_input_corpus_covers_every_source_with_at_least_40_cases():
    assert len(BAD_INPUTS) >= 40
    assert len({(source, case) for source, case, _ in BAD_INPUTS}) == len(BAD_INPUTS)
    assert Counter(source for source, _, _ in BAD_INPUTS).keys() == {"folder", "finet2i", "laion", "cache"}


# --------------------------------------------------------------------------- folders


def test_folder_bad_inputs_are_counted_by_reason(tmp_path):
    corpus = make_bad_input_corpus(tmp_path)
    (tmp_path / "gif_named_png.png").write_bytes(encode(photo_pixels("rocket"), "GIF"))
    (tmp_path / "gif_named_png.txt").write_text("a rocket in 256 colours")

    reasons = reasons_by_key(build_source(FolderConfig(root=str(tmp_path))), PREPROCESS)

    assert {key: reason for key, reason in reasons.items() if reason is not None} == expected("folder")
    assert {key for key, reason in corpus.items() if reason is None} <= {k for k, r in reasons.items() if r is None}


# --------------------------------------------------------------------------- fine-t2i


def add_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def add_sample(archive: tarfile.TarFile, record: dict) -> None:
    for extension in ("jpg", "json", "txt"):
        value = record[extension]
        add_member(archive, f"{record['__key__']}.{extension}",
                   json.dumps(value).encode() if extension == "json" else value if isinstance(value, bytes)
                   else value.encode())


def tar_bytes(write) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        write(archive)
    return buffer.getvalue()


def finet2i_member_cases(archive: tarfile.TarFile) -> None:
    """Good samples around one sample per bad-member case, all in one tar."""
    good = finet2i_records((PHOTOS_BY_NAME["astronaut"], PHOTOS_BY_NAME["coffee"]))
    template = good[0]
    add_sample(archive, good[0])

    def sample(key: str, **files: bytes) -> None:
        for extension, data in files.items():
            add_member(archive, f"{key}.{extension}", data)

    record = json.dumps(template["json"]).encode()
    sample("json_array", jpg=template["jpg"], json=b"[]", txt=b"a caption")
    sample("json_invalid", jpg=template["jpg"], json=b"{not json", txt=b"a caption")
    sample("json_nested_deep", jpg=template["jpg"], json=b"[" * 100_000, txt=b"a caption")
    sample("prompt_not_text", jpg=template["jpg"], json=json.dumps({"enhanced_prompt": 5}).encode())
    sample("huge", jpg=bytes(FINET2I_MEMBER_CAP + 1), json=record)
    sample("twice", jpg=template["jpg"])
    sample("twice", jpg=template["jpg"], json=record)
    sample("no_image", json=record, txt=b"a caption")
    add_member(archive, "README", b"not a sample file")
    sample("html_as_jpg", jpg=b"<html><body>gone</body></html>", json=record)
    sample("gif_as_jpg", jpg=encode(photo_pixels("rocket"), "GIF"), json=record)
    sample("empty_prompt", jpg=template["jpg"], json=json.dumps({"enhanced_prompt": "  "}).encode())
    add_sample(archive, good[1])


def with_header_field(data: bytes, header: int, start: int, value: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[header + start:header + start + len(value)] = value
    seal(damaged, header)
    return bytes(damaged)


def finet2i_archive_cases() -> dict[str, bytes]:
    """One damaged tar per archive-level case; each starts with a whole good sample."""
    [first, second] = finet2i_records((PHOTOS_BY_NAME["chelsea"], PHOTOS_BY_NAME["rocket"]))
    plain = tar_bytes(lambda archive: (add_sample(archive, first), add_sample(archive, second)))
    second_header = 3 * 512 + sum(-(-len(data) // 512) * 512 for data in (
        first["jpg"], json.dumps(first["json"]).encode(), first["txt"].encode()))
    return {
        "gzipped": gzip.compress(plain),
        "cut_short": plain[:second_header + 1000],
        "garbled_header": plain[:second_header] + b"\xff" * 512 + plain[second_header + 512:],
        "negative_size": with_header_field(plain, second_header, 124, b"-0000001000\0"),
        "zero_length_pax_record": plain[:second_header] + pax_header([b"0 path=x\n"]) + plain[second_header:],
    }


def test_finet2i_bad_members_and_archives_are_counted_and_the_rest_is_encoded(tmp_path):
    (tmp_path / "members.tar").write_bytes(tar_bytes(finet2i_member_cases))
    for name, data in finet2i_archive_cases().items():
        (tmp_path / f"{name}.tar").write_bytes(data)
    source = build_source(FineT2IConfig(uris=[str(tmp_path)], max_member_bytes=FINET2I_MEMBER_CAP))

    observed, good = {}, []
    for unit in source.list_units():
        tar = unit.uri.rsplit("/", 1)[-1].removesuffix(".tar")
        for key, reason in reasons_by_key(SingleUnit(source, unit), PREPROCESS).items():
            if reason is None:
                good.append((tar, key))
            else:
                observed[tar if key.endswith(ARCHIVE_KEY_SUFFIX) else key] = reason

    assert observed == expected("finet2i")
    # Around the bad members, both good samples; before each kind of archive damage, the whole first
    # sample (a compressed tar is not read at all).
    assert sorted(good) == sorted([("members", "ft2i-000000"), ("members", "ft2i-000001")] + [
        (tar, "ft2i-000000") for tar in ("cut_short", "garbled_header", "negative_size", "zero_length_pax_record")])


class SingleUnit:
    """One unit of a source, as a source (for `reasons_by_key`)."""

    def __init__(self, source, unit) -> None:
        self.source, self.unit = source, unit

    def list_units(self):
        return [self.unit]

    def iter_samples(self, unit):
        return self.source.iter_samples(unit)


# --------------------------------------------------------------------------- LAION


@pytest.fixture(scope="module")
def image_server():
    with LoopbackImageServer() as server:
        yield server


def laion_cases(server: LoopbackImageServer) -> dict[str, str | None]:
    port = server.base_url.rsplit(":", 1)[1]
    return {
        "deleted": server.url("status/404"),
        "forbidden": server.url("status/403"),
        "slow_answer": server.url("slow/coffee.jpg"),
        "half_body": server.url("truncated/rocket.jpg"),
        "html_page": server.url("not-image"),
        "huge_body": server.url("large"),
        "no_caption": server.url("image/flower.jpg"),
        "no_url": None,
        "redirect_loop": server.url("redirect-loop"),
        "redirect_chain_too_long": server.url("redirect/4/astronaut.jpg"),
        "redirect_to_loopback": server.url(f"redirect-to?url=http://127.0.0.2:{port}/image/astronaut.jpg"),
        "redirect_to_metadata_service": server.url("redirect-to?url=http://169.254.169.254/latest/meta-data/"),
        "loopback_ipv6": f"http://[::1]:{port}/image/astronaut.jpg",
        "mapped_loopback": f"http://[::ffff:127.0.0.3]:{port}/image/astronaut.jpg",
        "private_network": "http://10.1.2.3/image.jpg",
        "metadata_service": "http://169.254.169.254/latest/meta-data/iam/",
        "multicast": "http://224.0.0.1/image.jpg",
        "file_scheme": "file:///etc/passwd",
        "ftp_scheme": "ftp://127.0.0.1/image.jpg",
        "unclosed_ipv6_host": "http://[::1/image.jpg",
        "too_many_headers": server.url("many-headers"),
        "header_line_too_long": server.url("long-header"),
        "invalid_status_line": server.url("bad-status"),
        "trickled_body": server.url("trickle/chelsea.jpg"),
        "gzip_encoded_body": server.url("gzip/chelsea.jpg"),
        "gif": server.url("gif"),
        # good rows among them
        "good_photo": server.url("image/astronaut.jpg"),
        "good_after_two_redirects": server.url("redirect/2/grace_hopper.jpg"),
        "good_after_a_503": server.flaky_url("china"),
        "good_despite_invalid_content_length": server.url("bad-length"),  # http.client reads to the close
    }


def test_laion_bad_rows_are_counted_by_reason_and_the_good_rows_fetched(tmp_path, image_server):
    cases = laion_cases(image_server)
    rows = [{"URL": url, "TEXT": None if key == "no_caption" else f"case {key}", "key": key}
            for key, url in cases.items()]
    path = make_laion_parquet(tmp_path / "part-00000.parquet", rows)
    # A 2.5 s read timeout (still under the 3 s slow answer, which a loaded machine only delays further) and a
    # 6 s deadline keep the good rows, and the retried invalid status line, clear of timeouts on a loaded machine.
    config = LaionConfig(uris=[str(path)], **{**LAION_FETCH_SETTINGS, "timeout_s": 2.5, "max_redirects": 3,
                                             "deadline_s": 6.0, "concurrency": 8})

    reasons = reasons_by_key(build_source(config), PREPROCESS)

    assert {key: reason for key, reason in reasons.items() if reason is not None} == expected("laion")
    assert [key for key, reason in reasons.items() if reason is None] == [
        "good_photo", "good_after_two_redirects", "good_after_a_503", "good_despite_invalid_content_length"]


# --------------------------------------------------------------------------- the cache reader


def cache_reasons(uri: str) -> Counter[str]:
    """What the train job's reader counts for one shard: shard-level reasons and undecodable samples."""
    handler = reader.SkipCounter()
    counts = Counter()
    for _, raw in reader.read_shard(uri, handler):
        try:
            decode_sample(raw)
        except CacheFormatError:
            counts["corrupt_sample"] += 1
    return counts + handler.counts


def test_damaged_cache_shards_are_counted_by_reason(tmp_path):
    write_tiny_cache(str(tmp_path / "cache"), shard_sizes=[2], sides=[4])
    [shard] = (tmp_path / "cache" / "shards").rglob("*.tar")
    data = shard.read_bytes()
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    second = next(m for m in members if m.name.startswith("unit000_0001")).offset
    without_text = bytearray()
    for member in members:  # the first sample loses its text.npy
        block = data[member.offset:member.offset_data + -(-member.size // 512) * 512]
        if member.name != "unit000_0000.text.npy":
            without_text += block
    meta_offset = next(m for m in members if m.name == "unit000_0000.meta.json")
    cases = {
        "negative_size": with_header_field(data, second, 124, b"-0000001000\0"),
        "zero_length_pax_record": data[:second] + pax_header([b"0 path=x\n"]) + data[second:],
        "huge_base256_size": with_header_field(data, second, 124, b"\x80" + (2**80).to_bytes(11, "big")),
        "random_bytes": bytes(range(256)) * 8,
        "cut_short": data[:second + 100],  # inside the second sample's first header
        "sample_without_text": bytes(without_text) + bytes(1024),
        "meta_not_an_object": data[:meta_offset.offset_data] + b"[]".ljust(meta_offset.size)
        + data[meta_offset.offset_data + meta_offset.size:],
    }
    observed = {}
    for name, damaged in cases.items():
        (tmp_path / f"{name}.tar").write_bytes(damaged)
        observed[name] = cache_reasons(str(tmp_path / f"{name}.tar"))
    observed["missing"] = cache_reasons(str(tmp_path / "missing.tar"))

    assert {name: sorted(counts) for name, counts in observed.items()} == {
        name: [reason] for name, reason in expected("cache").items()}
    assert cache_reasons(str(shard)) == Counter()  # the undamaged shard reads clean


def test_laion_fetches_only_public_hosts_by_default_and_refuses_before_connecting(tmp_path, image_server):
    port = image_server.base_url.rsplit(":", 1)[1]
    urls = [image_server.url("image/rocket.jpg?default-policy"), f"http://localhost:{port}/image/rocket.jpg"]
    path = make_laion_parquet(tmp_path / "p.parquet", [{"URL": url, "TEXT": "a rocket"} for url in urls])
    settings = {name: value for name, value in LAION_FETCH_SETTINGS.items() if name != "allowed_networks"}

    samples = [s for unit in build_source(LaionConfig(uris=[str(path)], **settings)).list_units()
               for s in build_source(LaionConfig(uris=[str(path)], **settings)).iter_samples(unit)]

    assert [sample.failure for sample in samples] == ["blocked_loopback", "blocked_loopback"]
    assert image_server.hits["/image/rocket.jpg?default-policy"] == 0  # refused before any connection
    assert image_server.hits["/image/rocket.jpg"] == 0


@pytest.mark.timeout(60)
def test_laion_retries_with_urllib3_and_ignores_a_hostile_retry_after(tmp_path, image_server):
    url = image_server.url("retry-after/coffee.jpg")
    path = make_laion_parquet(tmp_path / "p.parquet", [{"URL": url, "TEXT": "a cup of coffee"}])

    [sample] = [s for unit in build_source(LaionConfig(uris=[str(path)], **LAION_FETCH_SETTINGS)).list_units()
                for s in build_source(LaionConfig(uris=[str(path)], **LAION_FETCH_SETTINGS)).iter_samples(unit)]

    assert sample.failure is None and sample.image_bytes[:2] == b"\xff\xd8"
    assert image_server.hits["/retry-after/coffee.jpg"] == 2  # retried once, without waiting an hour


def test_image_formats_must_be_pillow_formats():
    with pytest.raises(ValidationError, match="'JPG'"):
        PreprocessConfig(image_formats=["JPG"])
