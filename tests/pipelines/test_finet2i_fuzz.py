"""Fuzz: damaged real fine-t2i tars cost samples, never the unit: every outcome is a sample or a counted reason.

The source must never raise on bad bytes (an exception fails the whole unit on every rerun), and
preprocessing must reject a damaged image with `SampleRejected`. The default suite runs a bounded
number of cases; the `slow` variant runs many more. A hang fails through pytest-timeout, a slow case
through hypothesis' per-case deadline.
"""

from __future__ import annotations

import functools
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from pipelines.preprocess import PreprocessConfig, SampleRejected, prepare_image
from pipelines.sources.base import InputUnit, RawSample
from pipelines.sources.finet2i import FineT2IConfig, FineT2ISource
from tests.fixtures.corpora import PHOTOS, finet2i_records, make_finet2i_tar
from tests.fixtures.tar_mutations import header_offsets, mutated_archives

FUZZ_EXAMPLES = 100
SLOW_FUZZ_EXAMPLES = 2000
CASE_DEADLINE = timedelta(seconds=10)  # a case decodes two photos; 10 s leaves room for a loaded machine
PREPROCESS = PreprocessConfig(resolution=64, multiple_of=32)


@functools.cache
def real_tar() -> bytes:
    with tempfile.TemporaryDirectory() as directory:
        return make_finet2i_tar(Path(directory, "train-000000.tar"), finet2i_records(PHOTOS[:2])).read_bytes()


def check_damaged_tar(archive: bytes, directory: Path) -> None:
    path = directory / "train-000000.tar"
    path.write_bytes(archive)
    # A cap below the photos' size makes the fuzz reach the skip-unread path too.
    source = FineT2ISource(FineT2IConfig(uris=[str(path)], max_member_bytes=len(real_tar()) // 3))
    for sample in source.iter_samples(InputUnit("fuzz", "finet2i", str(path))):
        assert isinstance(sample, RawSample)
        assert (sample.failure is None) == (sample.image_bytes is not None and sample.caption is not None)
        if sample.failure is None:
            try:
                prepare_image(sample.image_bytes, PREPROCESS)
            except SampleRejected:
                pass  # one bad image: counted by its reason


def fuzz(examples: int):
    archive = real_tar()

    @settings(max_examples=examples, deadline=CASE_DEADLINE, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])
    @given(damaged=mutated_archives(archive, header_offsets(archive)))
    def run(tmp_path, damaged):
        check_damaged_tar(damaged, tmp_path)

    return run


@pytest.mark.timeout(300)
def test_damaged_finet2i_tars_yield_samples_or_counted_reasons(tmp_path):
    fuzz(FUZZ_EXAMPLES)(tmp_path)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_damaged_finet2i_tars_yield_samples_or_counted_reasons_long(tmp_path):
    fuzz(SLOW_FUZZ_EXAMPLES)(tmp_path)
