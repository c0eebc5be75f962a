"""The encode job in one Python process: the same stage objects as the Ray graph, called in a plain loop.

This is what the throughput benchmark compares the Ray job against, and what tests use without Ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pipelines.actors import (
    EncoderCard,
    ImageEncoderActor,
    ShardFragmentWriter,
    TextEncoderActor,
    UnitReader,
    encoder_card,
    unit_row,
)
from pipelines.config import EncodeJobConfig
from pipelines.job import JobSummary, run_encode
from pipelines.sources.base import InputUnit


class LocalEncoder:
    """Reader, both encoders and the writer, built once; `execute` has the shape `run_encode` expects."""

    def __init__(self, job: EncodeJobConfig) -> None:
        self.job = job
        self.images = ImageEncoderActor(job.codec, keep_pixels=job.output.store_pixels)
        self.texts = TextEncoderActor(job.text)
        self.card = encoder_card(self.images.codec, self.texts.encoder)

    def execute(self, units: list[InputUnit], card: EncoderCard) -> Iterator[dict[str, Any]]:
        reader = UnitReader(self.job)
        writer = ShardFragmentWriter(self.job.output, text_dtype=self.job.text.storage_dtype, encoder_ids=card.ids())
        fragment: list[dict[str, Any]] = []
        for unit in units:
            for row in reader(unit_row(unit)):
                fragment.append(row)
                if len(fragment) >= self.job.output.fragment_samples:
                    yield from writer.process(self.texts.process(self.images.process(fragment)))
                    fragment = []
        if fragment:
            yield from writer.process(self.texts.process(self.images.process(fragment)))


def run_local(job: EncodeJobConfig, *, units: list[InputUnit] | None = None) -> JobSummary:
    """Encode `job` without Ray (benchmark (a), tests); same outputs and bookkeeping as the Ray graph."""
    encoder = LocalEncoder(job)
    return run_encode(job, encoder.card, encoder.execute, units=units)
