"""Fuzz: damaged real cache shards either yield members or raise TarFormatError, in bounded time.

The default suite runs a bounded number of cases (`FUZZ_EXAMPLES`); the `slow` variant runs many more.
A hang fails through pytest-timeout, a slow case through hypothesis' per-case deadline.
"""

from __future__ import annotations

import functools
import io
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from pipelines.demo.synthetic_cache import write_tiny_cache
from services.cache import reader
from services.cache.schema import CacheFormatError, decode_sample
from services.cache.tar_members import MAX_MEMBER_SIZE, TarFormatError, TarMembers, TarStream
from tests.fixtures.tar_mutations import header_offsets, mutated_archives
from tests.trainer.reference_shards import write_reference_shard

FUZZ_EXAMPLES = 300
SLOW_FUZZ_EXAMPLES = 3000
CASE_DEADLINE = timedelta(seconds=5)  # a real case takes milliseconds; 5 s leaves room for a loaded machine


@functools.cache
def real_shards() -> tuple[bytes, ...]:
    """A shard written by the cache writer the encode job uses, and one in the reference layout."""
    with tempfile.TemporaryDirectory() as directory:
        write_tiny_cache(f"{directory}/cache", shard_sizes=[3], sides=[4])
        [shard] = Path(directory, "cache", "shards").rglob("*.tar")
        write_reference_shard(f"{directory}/reference.tar", ["ref_0", "ref_1"])
        return shard.read_bytes(), Path(directory, "reference.tar").read_bytes()


def parsed(archive: bytes, stream: bool) -> tuple[list[tuple[str, bytes]], bool, str | None]:
    """(members, complete, error) as the in-memory or the stream reader sees them."""
    members = TarStream(io.BytesIO(archive), max_member_bytes=MAX_MEMBER_SIZE) if stream else TarMembers(
        memoryview(archive))
    found = []
    try:
        for name, contents in members:
            found.append((name, bytes(contents)))
    except TarFormatError as error:
        return found, False, str(error)
    return found, members.complete, None


def check_damaged_shard(archive: bytes, directory: Path) -> None:
    in_memory = parsed(archive, stream=False)
    # The two readers share one parser: any difference is a bug in how one of them reads.
    assert parsed(archive, stream=True) == in_memory
    path = directory / "damaged.tar"
    path.write_bytes(archive)
    handler = reader.SkipCounter()
    samples = list(reader.read_shard(str(path), handler))
    assert len(samples) <= len(in_memory[0])
    for _, raw in samples:
        try:
            decode_sample(raw)
        except CacheFormatError:
            pass  # one bad sample: the train job counts it as corrupt_sample


def fuzz(examples: int):
    shards = real_shards()
    strategy = mutated_archives(shards[0], header_offsets(shards[0])) | mutated_archives(
        shards[1], header_offsets(shards[1]))

    @settings(max_examples=examples, deadline=CASE_DEADLINE, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(archive=strategy)
    def run(tmp_path, archive):
        check_damaged_shard(archive, tmp_path)

    return run


@pytest.mark.timeout(300)
def test_damaged_cache_shards_yield_members_or_the_format_error(tmp_path):
    fuzz(FUZZ_EXAMPLES)(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_damaged_cache_shards_yield_members_or_the_format_error_long(tmp_path):
    fuzz(SLOW_FUZZ_EXAMPLES)(tmp_path)
