"""The encode job's stages as plain callables: read a unit, encode images, encode captions, write shards.

Ray Data runs them as read tasks and actor pools (`pipelines/graph.py`); `pipelines/local_loop.py` runs
the very same objects in one process. Between stages, rows are Arrow tables of `ROW_SCHEMA` (arrays as
.npy bytes, so variable shapes need no tensor extension types). Every sample of a unit ends up in
exactly one writer account row, either written or dropped with a reason, and a unit's last row
(`unit_end`, or `unit_error` if the unit could not be read) says how many samples the unit has.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from pipelines.config import CodecStageConfig, EncodeJobConfig, OutputConfig, TextStageConfig
from pipelines.preprocess import PreprocessConfig, SampleRejected, prepare_image
from pipelines.sources import build_source
from pipelines.sources.base import InputUnit, RawSample
from services.cache.names import safe_stem
from services.cache.schema import CacheSample, npy_bytes, npy_view
from services.cache.writer import UnitShardWriter
from services.encoders import Codec, TextEncoder, build_codec, build_text_encoder

logger = logging.getLogger(__name__)

SAMPLE = "sample"  # a prepared (and later encoded) sample
DROPPED = "dropped"  # a sample that will not be written; `reason` says why
UNIT_END = "unit_end"  # the unit was read to the end; `total` samples in all
UNIT_ERROR = "unit_error"  # the unit could not be read to the end; `reason` says why

ROW_SCHEMA = pa.schema([
    ("unit", pa.string()), ("kind", pa.string()), ("index", pa.int64()), ("key", pa.string()),
    ("reason", pa.string()), ("total", pa.int64()), ("caption", pa.string()), ("meta", pa.string()),
    ("pixels", pa.binary()), ("latent", pa.binary()), ("text", pa.binary()),
])  # fmt: skip

# One row per (writer call, unit): what became of every sample index the call saw.
ACCOUNT_SCHEMA = pa.schema([
    ("unit", pa.string()), ("indices", pa.list_(pa.int64())), ("total", pa.int64()), ("error", pa.string()),
    ("shards", pa.string()), ("failures", pa.string()), ("samples_written", pa.int64()), ("bytes", pa.int64()),
])  # fmt: skip

CODEC_ERROR = "codec_error"
TEXT_ENCODER_ERROR = "text_encoder_error"
PREPROCESS_ERROR = "preprocess_error"
NOT_STORABLE = "not_storable"


def make_row(unit: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A row with every column of ROW_SCHEMA present, so every block has the same Arrow schema."""
    row = {"unit": unit, "kind": kind, "index": -1, "key": "", "reason": "", "total": -1, "caption": "",
           "meta": "{}", "pixels": b"", "latent": b"", "text": b""}  # fmt: skip
    unknown = set(fields) - set(row)
    if unknown:
        raise KeyError(f"row fields {sorted(unknown)} are not in ROW_SCHEMA")
    row.update(fields)
    return row


def rows_to_table(rows: list[dict[str, Any]], schema: pa.Schema = ROW_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def unit_row(unit: InputUnit) -> dict[str, Any]:
    """The item Ray Data schedules for one input unit."""
    return {"unit": unit.name, "source": unit.source, "uri": unit.uri, "options": json.dumps(unit.options)}


def unit_from_row(row: dict[str, Any]) -> InputUnit:
    return InputUnit(name=row["unit"], source=row["source"], uri=row["uri"], options=json.loads(row["options"]))


def _metrics():
    """The job's Ray metrics inside a Ray worker or driver; None in a plain Python process (benchmark a)."""
    import ray

    if not ray.is_initialized():
        return None
    from services.metrics import EncodeMetrics

    return EncodeMetrics()


class StageTimer:
    """Adds up seconds per stage and reports them to Ray metrics once per batch (each call crosses into Ray)."""

    def __init__(self) -> None:
        self.metrics = _metrics()

    def observe(self, stage: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.stage_seconds(stage, seconds)


# --------------------------------------------------------------------------- stage 1: read and prepare


class UnitReader:
    """Read + decode: one input unit -> prepared samples grouped by bucket, dropped samples, an end row."""

    def __init__(self, job: EncodeJobConfig) -> None:
        self.source = build_source(job.source)
        self.preprocess = job.preprocess
        self.bucket_window = job.read.bucket_window
        self.timer = StageTimer()

    def __call__(self, item: dict[str, Any]) -> Iterator[dict[str, Any]]:
        unit = unit_from_row(item)
        window: list[dict[str, Any]] = []
        count = 0
        seconds = Counter()
        samples = iter(self.source.iter_samples(unit))
        try:
            while True:
                started = time.perf_counter()
                raw = next(samples, None)
                seconds["read"] += time.perf_counter() - started
                if raw is None:
                    break
                started = time.perf_counter()
                row = prepare_row(unit.name, count, raw, self.preprocess)
                seconds["decode"] += time.perf_counter() - started
                count += 1
                if row["kind"] == DROPPED:
                    yield row
                    continue
                window.append(row)
                if len(window) >= self.bucket_window:
                    yield from _grouped_by_shape(window)
                    window = []
                    self._report(seconds)
        except Exception as exc:  # the unit stays unfinished (no progress record): the next run redoes it
            logger.exception("unit %s (%s) could not be read past sample %d", unit.name, unit.uri, count)
            yield make_row(unit.name, UNIT_ERROR, reason=f"{type(exc).__name__}: {exc}"[:500])
            return
        yield from _grouped_by_shape(window)
        self._report(seconds)
        yield make_row(unit.name, UNIT_END, total=count)

    def _report(self, seconds: Counter) -> None:
        for stage, value in seconds.items():
            self.timer.observe(stage, value)
        seconds.clear()


def prepare_row(unit: str, index: int, raw: RawSample, preprocess: PreprocessConfig) -> dict[str, Any]:
    """One raw sample -> a `sample` row with codec-ready pixels, or a `dropped` row with its reason."""
    if raw.failure is not None:
        return make_row(unit, DROPPED, index=index, key=raw.key, reason=raw.failure)
    try:
        prepared = prepare_image(raw.image_bytes or b"", preprocess)
    except SampleRejected as rejected:
        return make_row(unit, DROPPED, index=index, key=raw.key, reason=rejected.reason)
    except Exception:  # a decoder bug must cost one sample, never the worker
        logger.exception("sample %s of unit %s: unexpected preprocessing failure", raw.key, unit)
        return make_row(unit, DROPPED, index=index, key=raw.key, reason=PREPROCESS_ERROR)
    meta = {
        **raw.meta,
        "unit": unit,
        "original_size": list(prepared.original_size),
        "crop_box": list(prepared.crop_box),
        "bucket": list(prepared.bucket),
    }
    return make_row(unit, SAMPLE, index=index, key=safe_stem(raw.key), caption=raw.caption or "",
                    meta=json.dumps(meta, sort_keys=True, default=str), pixels=npy_bytes(prepared.pixels))  # fmt: skip


def _grouped_by_shape(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows ordered by image bucket (then index), so consecutive rows batch into one tensor shape."""
    return sorted(rows, key=lambda row: (json.loads(row["meta"])["bucket"], row["index"]))


# --------------------------------------------------------------------------- stages 2 and 3: encoders


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _encode_or_drop(
    rows: list[dict[str, Any]], encode: Callable[[list[dict[str, Any]]], None], reason: str, what: str
) -> None:
    """Run `encode` on the batch; if it fails, retry sample by sample so one bad input drops only itself."""
    try:
        encode(rows)
        return
    except Exception:
        logger.exception("%s failed on a batch of %d; retrying sample by sample", what, len(rows))
    for row in rows:
        try:
            encode([row])
        except Exception as exc:
            logger.warning("%s: sample %s of unit %s dropped as %s (%s)", what, row["key"], row["unit"], reason, exc)
            row.update(kind=DROPPED, reason=reason, pixels=b"", latent=b"", text=b"", meta="{}", caption="")


class ArrowStage:
    """Adapts a rows -> rows stage to Ray Data's `map_batches(batch_format="pyarrow")`."""

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rows_to_table(self.process(batch.to_pylist()))


def use_stage_threads(stage: CodecStageConfig | TextStageConfig) -> None:
    threads = stage.torch_threads()
    if threads is not None:
        torch.set_num_threads(threads)


class ImageEncoderActor(ArrowStage):
    """The image codec: pixels -> normalised latents, batched by image shape."""

    def __init__(self, stage: CodecStageConfig, *, codec: Codec | None = None, keep_pixels: bool = False) -> None:
        use_stage_threads(stage)
        self.keep_pixels = keep_pixels  # output.store_pixels: the writer stores them beside the latent
        self.codec = codec or build_codec(stage.name, device=stage.device, dtype=stage.dtype, tiny=stage.tiny,
                                          **stage.options)  # fmt: skip
        self.batch_size = stage.batch_size
        self.timer = StageTimer()

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        by_shape: dict[tuple[int, ...], list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            if row["kind"] == SAMPLE:
                by_shape[npy_view(row["pixels"], f"pixels of {row['key']}").shape].append(row)
        for same_shape in by_shape.values():
            for chunk in _chunks(same_shape, self.batch_size):
                _encode_or_drop(chunk, self._encode, CODEC_ERROR, f"codec {self.codec.spec.name}")
        self.timer.observe("vae", time.perf_counter() - started)
        return rows

    def _encode(self, rows: list[dict[str, Any]]) -> None:
        pixels = np.stack([npy_view(row["pixels"], f"pixels of {row['key']}") for row in rows])  # (B, H, W, 3)
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
        latents = self.codec.encode(images).cpu().numpy()
        for row, latent in zip(rows, latents, strict=True):
            row["latent"] = npy_bytes(latent.astype(np.float32))
            if not self.keep_pixels:  # pixels are done with: dropping them keeps later blocks small
                row["pixels"] = b""


class TextEncoderActor(ArrowStage):
    """The text encoder: captions -> last hidden states of their real tokens."""

    def __init__(self, stage: TextStageConfig, *, encoder: TextEncoder | None = None) -> None:
        use_stage_threads(stage)
        self.encoder = encoder or build_text_encoder(stage.name, device=stage.device, dtype=stage.dtype,
                                                     tiny=stage.tiny, **stage.options)  # fmt: skip
        self.batch_size = stage.batch_size
        self.timer = StageTimer()

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        # Similar lengths in one call waste less compute on padding.
        samples = sorted((row for row in rows if row["kind"] == SAMPLE), key=lambda row: len(row["caption"]))
        for chunk in _chunks(samples, self.batch_size):
            _encode_or_drop(chunk, self._encode, TEXT_ENCODER_ERROR, f"text encoder {self.encoder.spec.name}")
        self.timer.observe("text", time.perf_counter() - started)
        return rows

    def _encode(self, rows: list[dict[str, Any]]) -> None:
        states = self.encoder.encode([row["caption"] for row in rows])
        for row, text in zip(rows, states, strict=True):
            row["text"] = npy_bytes(text.numpy().astype(np.float32))


# --------------------------------------------------------------------------- stage 4: shard writer


def fragment_stem(unit: str, first_index: int) -> str:
    """The shard stem of one writer call's samples of `unit`: deterministic from the unit and first index."""
    return f"{safe_stem(unit)}-{first_index:06d}"


class ShardFragmentWriter:
    """Writes each call's encoded samples as shards per (unit, bucket) and returns one account row per unit."""

    def __init__(self, output: OutputConfig, *, text_dtype: str, encoder_ids: dict[str, Any]) -> None:
        self.output = output
        self.text_dtype = text_dtype
        self.encoder_ids = encoder_ids
        self.timer = StageTimer()

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rows_to_table(self.process(batch.to_pylist()), ACCOUNT_SCHEMA)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        by_unit: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_unit[row["unit"]].append(row)
        accounts = [self._write_unit(unit, unit_rows) for unit, unit_rows in sorted(by_unit.items())]
        self.timer.observe("write", time.perf_counter() - started)
        self._report(accounts)
        return accounts

    def _write_unit(self, unit: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
        samples = sorted((row for row in rows if row["kind"] == SAMPLE), key=lambda row: row["index"])
        dropped = Counter(row["reason"] for row in rows if row["kind"] == DROPPED)
        shards = []
        written = 0
        if samples:
            writer = UnitShardWriter(
                self.output.uri, fragment_stem(unit, samples[0]["index"]), latent_dtype=self.output.latent_dtype,
                text_dtype=self.text_dtype, max_samples_per_shard=self.output.max_samples_per_shard,
            )  # fmt: skip
            for row in samples:
                try:
                    writer.write(self._cache_sample(row))
                except ValueError as exc:  # e.g. an encoder output that overflows fp16: drop it, keep the rest
                    logger.warning("sample %s of unit %s dropped as %s: %s", row["key"], unit, NOT_STORABLE, exc)
                    dropped[NOT_STORABLE] += 1
            shards = writer.close()
            written = writer.samples_written
        ends = [row for row in rows if row["kind"] in (UNIT_END, UNIT_ERROR)]
        return {
            "unit": unit,
            "indices": [row["index"] for row in rows if row["kind"] in (SAMPLE, DROPPED)],
            "total": max((row["total"] for row in ends), default=-1),
            "error": next((row["reason"] for row in ends if row["kind"] == UNIT_ERROR), ""),
            "shards": json.dumps([shard.model_dump() for shard in shards]),
            "failures": json.dumps(dict(sorted(dropped.items()))),
            "samples_written": written,
            "bytes": sum(shard.num_bytes for shard in shards),
        }

    def _cache_sample(self, row: dict[str, Any]) -> CacheSample:
        where = f"sample {row['key']} of unit {row['unit']}"
        return CacheSample(
            key=row["key"],
            latent=npy_view(row["latent"], f"latent of {where}"),
            text=npy_view(row["text"], f"text of {where}"),
            caption=row["caption"],
            meta={**json.loads(row["meta"]), **self.encoder_ids},
            pixels=npy_view(row["pixels"], f"pixels of {where}") if self.output.store_pixels else None,
        )

    def _report(self, accounts: list[dict[str, Any]]) -> None:
        metrics = self.timer.metrics
        if metrics is None:
            return
        metrics.images_encoded(sum(account["samples_written"] for account in accounts))
        metrics.bytes_written(sum(account["bytes"] for account in accounts))
        metrics.shards_written(sum(len(json.loads(account["shards"])) for account in accounts))
        for account in accounts:
            for reason, count in json.loads(account["failures"]).items():
                metrics.failures(reason, count)


# --------------------------------------------------------------------------- what the manifest records


@dataclass
class EncoderCard:
    """What the cache records about its encoders, plus the encoder's output for the empty prompt."""

    codec: dict[str, Any]  # the registry's describe()
    latent_channels: int
    latent_downscale: int
    latent_scale: float
    latent_shift: float
    text_encoder: dict[str, Any]
    text_dim: int
    text_max_len: int
    null_text: np.ndarray  # (L, D) float32

    def ids(self) -> dict[str, Any]:
        """Codec and encoder ids stored in every sample's meta."""
        return {"codec": self.codec["name"], "text_encoder": self.text_encoder["name"]}


def encoder_card(codec: Codec, text_encoder: TextEncoder) -> EncoderCard:
    spec = codec.spec
    return EncoderCard(
        codec=codec.describe(), latent_channels=spec.latent_channels, latent_downscale=spec.downscale,
        latent_scale=spec.scale, latent_shift=spec.shift, text_encoder=text_encoder.describe(),
        text_dim=text_encoder.spec.dim, text_max_len=text_encoder.spec.max_length,
        null_text=text_encoder.encode([""])[0].numpy().astype(np.float32),
    )  # fmt: skip


def build_encoder_card(job: EncodeJobConfig) -> EncoderCard:
    """Build both encoders once (on their configured device) to read their specs and the null text."""
    codec_stage, text_stage = job.codec, job.text
    codec = build_codec(codec_stage.name, device=codec_stage.device, dtype=codec_stage.dtype, tiny=codec_stage.tiny,
                        **codec_stage.options)  # fmt: skip
    text = build_text_encoder(text_stage.name, device=text_stage.device, dtype=text_stage.dtype,
                              tiny=text_stage.tiny, **text_stage.options)  # fmt: skip
    return encoder_card(codec, text)
