"""The encode graph's pieces without Ray: reader rows, encoder actors, fragment writer, ledger, resume."""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipelines.actors import (
    DROPPED,
    SAMPLE,
    UNIT_END,
    UNIT_ERROR,
    ImageEncoderActor,
    ShardFragmentWriter,
    TextEncoderActor,
    UnitReader,
    make_row,
    prepare_row,
    rows_to_table,
    unit_row,
)
from pipelines.config import EncodeJobConfig
from pipelines.demo.photos import write_photo_folder
from pipelines.graph import actor_pool
from pipelines.job import delete_stale_shards, run_encode, selected_units
from pipelines.ledger import UnitLedger
from pipelines.local_loop import LocalEncoder, run_local
from pipelines.preprocess import PreprocessConfig
from pipelines.sources.base import InputUnit, RawSample
from services import storage
from services.cache.manifest import list_progress, read_manifest, read_plan, read_progress, shard_uris
from services.cache.reader import SkipCounter, read_samples
from services.cache.schema import npy_bytes, npy_view
from services.config import ConfigError, load_config
from tests.fixtures.corpora import make_bad_input_corpus, photo_jpeg

REPO = Path(__file__).resolve().parents[2]
SMALL = PreprocessConfig(resolution=64, min_size=16)


def job_config(root: Path, out: Path, **changes) -> EncodeJobConfig:
    """Folder corpus -> pixel codec (exact) + tiny MiniLM: the fastest real graph."""
    data = {
        "source": {"kind": "folder", "root": str(root), "files_per_unit": 3},
        "preprocess": {"resolution": 64, "min_size": 16},
        "codec": {"name": "pixel", "options": {"factor": 8}, "batch_size": 4},
        "text": {"name": "minilm", "tiny": True, "batch_size": 4},
        "output": {"uri": str(out), "fragment_samples": 4, "max_samples_per_shard": 8},
        "progress_bar": False,
    }
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return EncodeJobConfig.model_validate(data)


def cached_samples(out: Path) -> list:
    return list(read_samples(shard_uris(str(out)), SkipCounter(fail_fast=True)))


@pytest.fixture
def folder(tmp_path) -> Path:
    write_photo_folder(tmp_path / "corpus")
    return tmp_path / "corpus"


def test_prepare_row_keeps_the_source_failure_reason():
    row = prepare_row("u", 3, RawSample("k", None, None, failure="http_404"), SMALL)
    assert (row["kind"], row["index"], row["key"], row["reason"]) == (DROPPED, 3, "k", "http_404")


def test_prepare_row_drops_an_undecodable_image_with_its_reason():
    row = prepare_row("u", 0, RawSample("k", b"<html>", "a caption"), SMALL)
    assert (row["kind"], row["reason"]) == (DROPPED, "decode_error")


def test_prepare_row_gives_bucket_sized_pixels_and_meta():
    row = prepare_row("u", 0, RawSample("k", photo_jpeg("chelsea"), "a cat", {"aesthetic_score": 5.0}), SMALL)
    meta = json.loads(row["meta"])
    assert row["kind"] == SAMPLE
    assert npy_view(row["pixels"], "pixels").shape == (64, 64, 3)
    assert meta["bucket"] == [64, 64] and meta["aesthetic_score"] == 5.0 and len(meta["crop_box"]) == 4


def test_unit_reader_accounts_every_bad_input_once_then_ends_with_the_total(tmp_path):
    expected = make_bad_input_corpus(tmp_path / "bad")
    job = job_config(tmp_path / "bad", tmp_path / "out", source={"files_per_unit": 100})
    (unit,) = selected_units(job)
    rows = list(UnitReader(job)(unit_row(unit)))
    samples = [row for row in rows if row["kind"] in (SAMPLE, DROPPED)]
    assert rows[-1]["kind"] == UNIT_END and rows[-1]["total"] == len(expected)
    assert sorted(row["index"] for row in samples) == list(range(len(expected)))
    assert {row["key"]: row["reason"] or None for row in samples} == expected


def test_unit_reader_emits_a_window_grouped_by_bucket(folder, tmp_path):
    buckets = {"buckets": [[64, 64], [96, 64], [64, 96]], "resolution": 64, "min_size": 16}
    job = job_config(folder, tmp_path / "out", preprocess=buckets, source={"files_per_unit": 100})
    (unit,) = selected_units(job)
    shapes = [json.loads(row["meta"])["bucket"] for row in UnitReader(job)(unit_row(unit)) if row["kind"] == SAMPLE]
    runs = [shape for position, shape in enumerate(shapes) if position == 0 or shapes[position - 1] != shape]
    assert len(set(map(tuple, shapes))) > 1 and len(runs) == len(set(map(tuple, runs)))


def test_unit_reader_turns_a_source_failure_into_a_unit_error_row(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    reader = UnitReader(job)

    def broken(unit):
        yield RawSample("first", photo_jpeg("coffee"), "coffee")
        raise ConnectionError("connection reset while reading the tar")

    reader.source.iter_samples = broken
    rows = list(reader(unit_row(InputUnit("u", "folder", "mem://u"))))
    assert rows[-1]["kind"] == UNIT_ERROR and "connection reset" in rows[-1]["reason"]
    assert not any(row["kind"] == UNIT_END for row in rows)


def test_image_encoder_encodes_mixed_shapes_in_one_batch_exactly(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    pixels = [np.random.default_rng(i).integers(0, 256, shape, dtype=np.uint8)
              for i, shape in enumerate([(64, 64, 3), (64, 96, 3), (64, 64, 3)])]  # fmt: skip
    rows = [make_row("u", SAMPLE, index=i, key=f"k{i}", pixels=npy_bytes(p)) for i, p in enumerate(pixels)]
    encoder = ImageEncoderActor(job.codec)
    out = encoder(rows_to_table(rows)).to_pylist()
    for row, original in zip(out, pixels, strict=True):
        latent = torch.tensor(npy_view(row["latent"], "latent"))[None]
        decoded = encoder.codec.decode(latent)[0].permute(1, 2, 0).numpy() * 255
        assert row["pixels"] == b"" and np.abs(decoded - original).max() < 1e-3


@pytest.fixture
def restore_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cpu_threads", [None, 1, "all"])
def test_encoder_actors_take_the_configured_cpu_threads(folder, tmp_path, restore_torch_threads, cpu_threads):
    """Ray starts fractional-CPU actors with one thread; `cpu_threads` gives a CPU-only pool the node's cores."""
    job = job_config(folder, tmp_path / "out", codec={"cpu_threads": cpu_threads}, text={"cpu_threads": cpu_threads})
    expected = {None: 3, 1: 1, "all": len(os.sched_getaffinity(0))}[cpu_threads]
    for build in (lambda: ImageEncoderActor(job.codec), lambda: TextEncoderActor(job.text)):
        torch.set_num_threads(3)
        build()
        assert torch.get_num_threads() == expected


def test_cpu_threads_are_left_alone_on_cuda(folder, tmp_path):
    job = job_config(folder, tmp_path / "out", codec={"cpu_threads": 2, "num_gpus": 1})
    assert job.codec.torch_threads() is None and job.text.torch_threads() is None


class ExplodingOn:
    """A text encoder that fails whenever a batch holds a caption containing `word`."""

    def __init__(self, real, word: str):
        self.real, self.word, self.spec = real, word, real.spec

    def encode(self, prompts):
        if any(self.word in prompt for prompt in prompts):
            raise RuntimeError("CUDA error: device-side assert triggered")
        return self.real.encode(prompts)


def test_an_encoder_failure_drops_only_the_failing_sample(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    actor = TextEncoderActor(job.text)
    actor.encoder = ExplodingOn(actor.encoder, "boom")
    rows = [make_row("u", SAMPLE, index=i, key=f"k{i}", caption=c) for i, c in enumerate(["a cat", "boom", "a dog"])]
    out = actor.process(rows)
    assert [row["kind"] for row in out] == [SAMPLE, DROPPED, SAMPLE]
    assert out[1]["reason"] == "text_encoder_error" and out[0]["text"] and out[2]["text"]


def encoded_rows(unit: str, indices: list[int], dim: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    return [
        make_row(unit, SAMPLE, index=i, key=f"{unit}-k{i}", caption=f"caption {i}", meta='{"bucket": [16, 16]}',
                 latent=npy_bytes(rng.standard_normal((4, 2, 2)).astype(np.float32)),
                 text=npy_bytes(rng.standard_normal((3, dim)).astype(np.float32)))
        for i in indices
    ]  # fmt: skip


def test_fragment_writer_names_shards_by_unit_and_first_index_and_accounts_every_row(tmp_path):
    job = job_config(tmp_path, tmp_path / "out")
    writer = ShardFragmentWriter(job.output, text_dtype="int8", encoder_ids={"codec": "pixel", "text_encoder": "m"})
    rows = [*encoded_rows("a", [5, 6]), make_row("a", DROPPED, index=7, reason="too_small"),
            *encoded_rows("b", [0]), make_row("b", UNIT_END, total=1)]  # fmt: skip
    accounts = {row["unit"]: row for row in writer(rows_to_table(rows)).to_pylist()}
    assert [s["path"] for s in json.loads(accounts["a"]["shards"])] == ["shards/2x2/a-000005-0000.tar"]
    assert sorted(accounts["a"]["indices"]) == [5, 6, 7] and accounts["a"]["total"] == -1
    assert json.loads(accounts["a"]["failures"]) == {"too_small": 1} and accounts["a"]["samples_written"] == 2
    assert accounts["b"]["total"] == 1 and (tmp_path / "out/shards/2x2/b-000000-0000.tar").is_file()


def test_fragment_writer_rewrites_the_same_batch_byte_for_byte(tmp_path):
    job = job_config(tmp_path, tmp_path / "out")
    writer = ShardFragmentWriter(job.output, text_dtype="fp16", encoder_ids={})
    first = writer.process(encoded_rows("a", [0, 1, 2]))
    data = (tmp_path / "out/shards/2x2/a-000000-0000.tar").read_bytes()
    second = writer.process(encoded_rows("a", [0, 1, 2]))
    assert first == second and (tmp_path / "out/shards/2x2/a-000000-0000.tar").read_bytes() == data


def account(unit: str, indices: list[int], *, total: int = -1, error: str = "", failures=None) -> dict:
    shards = [{"path": f"shards/1x1/{unit}-{indices[0]:06d}-0000.tar", "bucket": "1x1", "num_samples": len(indices),
               "num_bytes": 10, "sha256": "0" * 64}] if indices else []  # fmt: skip
    return {"unit": unit, "indices": indices, "total": total, "error": error, "shards": json.dumps(shards),
            "failures": json.dumps(failures or {}), "samples_written": len(indices), "bytes": 10}  # fmt: skip


UNITS = [InputUnit("a", "folder", "mem://a"), InputUnit("b", "folder", "mem://b")]


def test_ledger_finishes_a_unit_only_when_every_index_is_back():
    ledger = UnitLedger(UNITS)
    assert ledger.record(account("a", [0, 1], total=4)) is None
    progress = ledger.record(account("a", [2, 3], failures={"timeout": 1}))
    assert progress.unit == "a" and progress.failures == {"timeout": 1} and len(progress.shards) == 2
    assert ledger.close() == {"b": "the stream ended with 0 of an unknown number of samples accounted for"}


def test_ledger_never_finishes_a_unit_whose_sample_came_back_twice():
    ledger = UnitLedger(UNITS)
    ledger.record(account("a", [0, 1]))
    assert ledger.record(account("a", [1, 2], total=3)) is None
    assert "twice" in ledger.close()["a"] and not ledger.finished


def test_ledger_fails_a_unit_that_could_not_be_read():
    ledger = UnitLedger(UNITS)
    assert ledger.record(account("b", [0], error="OSError: tar truncated")) is None
    assert ledger.close()["b"] == "OSError: tar truncated"


def test_delete_stale_shards_spares_units_whose_names_extend_the_deleted_one(tmp_path):
    names = ["a-000000-0000.tar", "a-000512-0001.tar", "a-b-000000-0000.tar", "a-000001-000000-0000.tar"]
    for name in names:
        (tmp_path / "shards/8x8").mkdir(parents=True, exist_ok=True)
        (tmp_path / "shards/8x8" / name).write_bytes(b"x")
    assert delete_stale_shards(str(tmp_path), ["a"]) == 2
    assert sorted(p.name for p in (tmp_path / "shards/8x8").iterdir()) == sorted(names[2:])


def test_local_run_writes_every_key_once_then_a_rerun_skips_finished_units(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    first = run_local(job)
    keys = [sample.key for sample in cached_samples(tmp_path / "out")]
    second = run_local(job)
    assert sorted(keys) == sorted(path.stem for path in folder.glob("*.jpg"))
    assert (first.units_finished, first.samples_written) == (3, 7)
    assert (second.units_already_done, second.units_finished, second.samples_written) == (3, 0, 0)
    assert read_manifest(str(tmp_path / "out")).num_samples == 7


def test_rerun_of_an_unfinished_unit_deletes_its_stale_shards_and_keeps_one_copy(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    run_local(job)
    unit = selected_units(job)[0].name
    (tmp_path / "out/_progress" / f"{unit}.json").unlink()  # as if killed before its progress was written
    stale = tmp_path / "out/shards/8x8" / f"{unit}-000001-0000.tar"
    stale.write_bytes(b"left by a killed writer")
    summary = run_local(job)
    keys = [sample.key for sample in cached_samples(tmp_path / "out")]
    assert (summary.units_already_done, summary.units_finished) == (2, 1)
    assert not stale.exists() and sorted(keys) == sorted(set(keys)) and len(keys) == 7


def test_a_resumed_run_fetches_each_progress_record_once_from_planning_to_publishing(folder, tmp_path, monkeypatch):
    job = job_config(folder, tmp_path / "out")
    run_local(job)
    units = [unit.name for unit in selected_units(job)]
    (tmp_path / "out/_progress" / f"{units[0]}.json").unlink()  # as if killed before its progress was written
    fetched: list[str] = []
    real_read_json = storage.read_json

    def counting_read_json(uri, config=None):
        if "/_progress/" in str(uri):
            fetched.append(Path(uri).stem)
        return real_read_json(uri, config)

    monkeypatch.setattr(storage, "read_json", counting_read_json)
    summary = run_local(job)
    assert (summary.units_already_done, summary.units_finished, summary.cache_samples) == (2, 1, 7)
    assert sorted(fetched) == sorted(units)  # two when planning, the redone one when publishing


def test_delete_stale_shards_lists_no_shard_when_no_unit_is_to_run(tmp_path, monkeypatch):
    (tmp_path / "shards/8x8").mkdir(parents=True)
    (tmp_path / "shards/8x8" / "a-000000-0000.tar").write_bytes(b"x")
    listed: list[str] = []
    real_list_uris = storage.list_uris
    monkeypatch.setattr(storage, "list_uris", lambda uri, **kwargs: listed.append(uri) or real_list_uris(uri, **kwargs))
    assert delete_stale_shards(str(tmp_path), []) == 0
    assert listed == [] and (tmp_path / "shards/8x8" / "a-000000-0000.tar").exists()


def test_overwrite_redoes_finished_units(folder, tmp_path):
    job = job_config(folder, tmp_path / "out")
    run_local(job)
    before = read_progress(str(tmp_path / "out"), selected_units(job)[0].name).finished_at
    summary = run_local(job.model_copy(update={"overwrite": True}))
    after = read_progress(str(tmp_path / "out"), selected_units(job)[0].name).finished_at
    assert summary.units_finished == 3 and after > before and len(cached_samples(tmp_path / "out")) == 7


def test_a_cache_made_with_another_text_storage_dtype_is_refused(folder, tmp_path):
    job = job_config(folder, tmp_path / "out", limit=1)
    run_local(job)
    with pytest.raises(ValueError, match="text_dtype: cache has fp16, config has int8"):
        run_local(job_config(folder, tmp_path / "out", limit=1, text={"storage_dtype": "int8"}))


def test_bad_inputs_are_counted_by_reason_in_progress_manifest_and_summary(tmp_path):
    expected = make_bad_input_corpus(tmp_path / "bad")
    summary = run_local(job_config(tmp_path / "bad", tmp_path / "out"))
    reasons = dict(Counter(reason for reason in expected.values() if reason))
    manifest = read_manifest(str(tmp_path / "out"))
    assert summary.failures == reasons and manifest.failures == reasons
    assert summary.samples_written == manifest.num_samples == sum(r is None for r in expected.values())


@pytest.mark.parametrize("path", sorted((REPO / "configs/encode").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_encode_configs_validate(path):
    assert load_config(EncodeJobConfig, path).output.uri


def test_fragments_larger_than_a_shard_are_refused(tmp_path):
    with pytest.raises(ValueError, match="fragment_samples"):
        job_config(tmp_path, tmp_path / "out", output={"fragment_samples": 9})
    with pytest.raises(ConfigError, match="source"):
        load_config(EncodeJobConfig, None, ["output.uri=/tmp/x"])


def test_account_rows_fit_their_arrow_schema(tmp_path):
    job = job_config(tmp_path, tmp_path / "out")
    table = ShardFragmentWriter(job.output, text_dtype="fp16", encoder_ids={})(rows_to_table(encoded_rows("a", [0])))
    assert isinstance(table, pa.Table) and table.num_rows == 1


def test_entry_point_names_the_bad_field_and_exits_2_before_starting_ray(tmp_path, capsys):
    from pipelines.encode_latents import main

    code = main(["--config", str(REPO / "configs/encode/folder-taef2-minilm.yaml"), "--set", "codec.batch_size=0"])
    assert code == 2 and "codec.batch_size" in capsys.readouterr().err


def test_an_encoder_pool_is_fixed_or_autoscales_within_an_ordered_range(tmp_path):
    fixed = actor_pool(job_config(tmp_path, tmp_path / "out", codec={"concurrency": 2}).codec)
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    autoscaling = actor_pool(job_config(tmp_path, tmp_path / "out", text={"concurrency": 1, "max_concurrency": 4}).text)
    assert (autoscaling.min_size, autoscaling.max_size) == (1, 4)
    with pytest.raises(ValueError, match=r"max_concurrency \(1\) must be >= concurrency \(2\)"):
        job_config(tmp_path, tmp_path / "out", codec={"concurrency": 2, "max_concurrency": 1})


def test_partitioned_jobs_share_one_corpus_and_the_last_manifest_covers_every_unit(folder, tmp_path):
    out = tmp_path / "out"
    jobs = [job_config(folder, out, partition={"index": index, "count": 2}) for index in range(2)]
    encoders = [LocalEncoder(job) for job in jobs]  # built here: transformers' lazy imports are not thread-safe
    with ThreadPoolExecutor(2) as pool:  # both publish their manifests at about the same time
        summaries = list(pool.map(lambda job, encoder: run_encode(job, encoder.card, encoder.execute), jobs, encoders))
    names = [unit.name for unit in selected_units(jobs[0])]
    assert [summary.units_finished for summary in summaries] == [2, 1]  # units 0, 2 and unit 1
    assert read_plan(str(out)).units == names
    assert sorted(progress.unit for progress in list_progress(str(out))) == sorted(names)
    assert read_manifest(str(out)).num_samples == 7
    assert sorted(sample.key for sample in cached_samples(out)) == sorted(path.stem for path in folder.glob("*.jpg"))


def test_a_partition_index_outside_the_count_is_refused(folder, tmp_path):
    with pytest.raises(ValueError, match=r"partition.index \(2\) must be < partition.count \(2\)"):
        job_config(folder, tmp_path / "out", partition={"index": 2, "count": 2})


def test_the_steady_rate_is_the_rate_through_the_middle_half_of_the_written_samples():
    from pipelines.job import steady_rate

    # Startup until t=20 s, then 16 samples every 2 s up to 64: a quarter (16) at 20 s, three quarters (48) at 24 s.
    assert steady_rate([(20.0, 16), (22.0, 32), (24.0, 48), (26.0, 64)], overall=2.0) == 8.0
    assert steady_rate([(20.0, 64)], overall=2.0) == 2.0  # one write: too short to tell, the overall rate
    assert steady_rate([], overall=0.0) == 0.0
