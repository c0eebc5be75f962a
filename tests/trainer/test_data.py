"""Deterministic per-rank streaming of the cache: disjoint ranks, equal steps, exact resume, skipped samples."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from pipelines.demo.synthetic_cache import TEXT_DIM, class_sample, write_tiny_cache
from services.cache.reader import CorruptCacheError
from services.cache.schema import encode_sample
from tests.trainer.reference_shards import write_reference_shard
from trainer.data import (
    PLACEHOLDER_KEY,
    DataPosition,
    TrainingStream,
    epoch_plan,
    index_shards,
    split_holdout,
)

NULL_TEXT = np.zeros((1, TEXT_DIM), np.float32)


@pytest.fixture
def cache(tmp_path):
    root = str(tmp_path / "cache")
    keys = write_tiny_cache(root, shard_sizes=[9, 12, 7, 10, 11, 6], sides=[8, 8, 8, 8, 4, 4])
    return root, keys


def stream(shards, rank=0, world_size=1, batch=4, start=None, **kwargs):
    return TrainingStream(shards, seed=3, rank=rank, world_size=world_size, batch_per_rank=batch, window_shards=2,
                          placeholder_text=NULL_TEXT, start=start, **kwargs)


def take(training_stream, count):
    batches = iter(training_stream)
    return [next(batches) for _ in range(count)]


def test_ranks_read_disjoint_samples_in_the_same_number_of_single_bucket_steps(cache):
    shards = index_shards([cache[0]])
    plans = [epoch_plan(shards, seed=0, epoch=0, rank=r, world_size=2, batch_per_rank=3, window_shards=2)
             for r in range(2)]
    assert len(plans[0]) == len(plans[1]) > 0
    assert [b.bucket for b in plans[0]] == [b.bucket for b in plans[1]]
    seen = [{address for batch in plan for address in batch.addresses} for plan in plans]
    assert not seen[0] & seen[1]
    for plan in plans:
        assert all(len({shards[s].bucket for s, _ in batch.addresses}) == 1 for batch in plan)


def test_an_epoch_visits_each_sample_at_most_once_and_the_next_epoch_reshuffles(cache):
    shards = index_shards([cache[0]])
    epoch0 = epoch_plan(shards, seed=0, epoch=0, rank=0, world_size=1, batch_per_rank=4, window_shards=2)
    epoch1 = epoch_plan(shards, seed=0, epoch=1, rank=0, world_size=1, batch_per_rank=4, window_shards=2)
    addresses = [a for batch in epoch0 for a in batch.addresses]
    assert len(addresses) == len(set(addresses))
    assert [b.addresses for b in epoch0] != [b.addresses for b in epoch1]


def test_batches_hold_one_latent_shape_and_text_padded_to_the_batch_maximum_with_a_mask(cache):
    for batch in take(stream(index_shards([cache[0]])), 8):
        lengths = batch["text_mask"].sum(dim=1)
        assert batch["text"].shape[1] == int(lengths.max())
        assert batch["latent"].shape[-1] == int(batch["bucket"].split("x")[1])
        assert batch["weights"].tolist() == [1.0] * 4


def test_resuming_from_a_data_position_continues_the_epoch_without_repeating_or_skipping(cache):
    shards = index_shards([cache[0]])
    uninterrupted = [batch["keys"] for batch in take(stream(shards), 14)]
    first = stream(shards)
    before = [batch["keys"] for batch in take(first, 5)]
    saved = DataPosition.from_json(first.position.to_json())
    after = [batch["keys"] for batch in take(stream(shards, start=saved), 9)]
    assert before + after == uninterrupted


def test_a_position_saved_at_the_end_of_an_epoch_resumes_at_the_next_epoch(cache):
    shards = index_shards([cache[0]])
    steps = len(stream(shards).plan(0))
    uninterrupted = [batch["keys"] for batch in take(stream(shards), steps + 2)]
    resumed = take(stream(shards, start=DataPosition(0, steps, 1, 4)), 2)
    assert [batch["keys"] for batch in resumed] == uninterrupted[steps:]


def test_a_loader_process_yields_the_same_batches_and_positions_as_threads(cache):
    shards = index_shards([cache[0]])
    steps = len(stream(shards).plan(0)) + 3  # into the next epoch
    runs = {}
    for loader_process in (False, True):
        training_stream = stream(shards, start=DataPosition(0, 2, 1, 4), loader_process=loader_process)
        runs[loader_process] = []
        for batch in iter(training_stream):
            runs[loader_process].append((batch, training_stream.position))
            if len(runs[loader_process]) == steps:
                break
    for (threaded, position), (from_process, process_position) in zip(runs[False], runs[True], strict=True):
        assert position == process_position
        assert threaded["keys"] == from_process["keys"] and threaded["bucket"] == from_process["bucket"]
        for name in ("latent", "text", "text_mask", "weights"):
            assert isinstance(from_process[name], torch.Tensor)
            assert torch.equal(threaded[name], from_process[name]), name
    assert runs[True][-1][1] == DataPosition(1, 5, 1, 4)  # started at batch 2: epoch 0 gave steps - 5


@pytest.mark.parametrize("loader_process", [False, True], ids=["threads", "loader-process"])
def test_a_corrupt_shard_becomes_counted_zero_weight_placeholders(cache, loader_process):
    shards = index_shards([cache[0]])
    with open(shards[1].uri, "r+b") as handle:  # garble the tar from byte 700 on
        handle.seek(700)
        handle.write(b"\xff" * 4000)
    training_stream = stream(shards, loader_process=loader_process)
    batches = take(training_stream, len(training_stream.plan(0)))
    placeholders = sum(key == PLACEHOLDER_KEY for batch in batches for key in batch["keys"])
    zero_weights = sum(int((batch["weights"] == 0).sum()) for batch in batches)
    assert placeholders > 0
    assert zero_weights == placeholders == sum(training_stream.skipped.values())
    # The manifest records the shard's sha256: the garbled bytes are caught before the tar is parsed.
    assert set(training_stream.skipped) == {"checksum_mismatch"}


def test_a_garbled_shard_without_a_manifest_becomes_unreadable_shard_placeholders(tmp_path, caplog):
    prefix = tmp_path / "reference"
    write_reference_shard(str(prefix / "000.tar"), [f"a{i}" for i in range(8)])
    write_reference_shard(str(prefix / "001.tar"), [f"b{i}" for i in range(8)], seed=1)
    with caplog.at_level("WARNING", logger="trainer.data"):
        shards = index_shards([str(prefix)])
    assert [record.message for record in caplog.records].count(
        f"2 of 2 shards come without a manifest (e.g. {shards[0].uri}): no recorded sha256, so they are read "
        "without a checksum check") == 1
    with open(shards[1].uri, "r+b") as handle:
        handle.seek(700)
        handle.write(b"\xff" * 4000)
    training_stream = stream(shards)
    batches = take(training_stream, len(training_stream.plan(0)))
    placeholders = sum(key == PLACEHOLDER_KEY for batch in batches for key in batch["keys"])
    assert placeholders > 0
    assert set(training_stream.skipped) <= {"unreadable_shard", "corrupt_sample"}
    assert sum(training_stream.skipped.values()) == placeholders


@pytest.mark.parametrize("loader_process", [False, True], ids=["threads", "loader-process"])
def test_a_corrupt_shard_fails_fast_when_configured(cache, loader_process):
    shards = index_shards([cache[0]])
    with open(shards[0].uri, "r+b") as handle:
        handle.seek(700)
        handle.write(b"\xff" * 4000)
    training_stream = stream(shards, fail_on_corrupt=True, loader_process=loader_process)
    with pytest.raises(CorruptCacheError, match=shards[0].uri):
        take(training_stream, len(training_stream.plan(0)))


def test_samples_whose_shapes_do_not_fit_their_bucket_become_counted_placeholders(tmp_path):
    rng = np.random.default_rng(0)
    samples = [class_sample(f"k{i}", i % 4, rng) for i in range(8)]
    samples[2] = class_sample("k2", 2, rng, side=4)  # a 4x4 latent in the 8x8 bucket
    samples[5].text = np.ones((2, TEXT_DIM // 2), np.float32)  # another text encoder's width
    buffer = io.BytesIO()
    with TarWriter(buffer, encoder=False) as tar:
        for sample in samples:
            tar.write(encode_sample(sample, latent_dtype="fp16", text_dtype="fp16"))
    (tmp_path / "000.tar").write_bytes(buffer.getvalue())
    training_stream = stream(index_shards([str(tmp_path / "000.tar")]))
    batches = take(training_stream, 2)
    keys = sorted(key for batch in batches for key in batch["keys"])
    assert keys == sorted([PLACEHOLDER_KEY] * 2 + [f"k{i}" for i in (0, 1, 3, 4, 6, 7)])
    assert all(batch["latent"].shape[1:] == (4, 8, 8) for batch in batches)
    assert training_stream.skipped == {"corrupt_sample": 2}


def test_shards_in_the_reference_layout_are_indexed_and_streamed(tmp_path):
    prefix = tmp_path / "reference"
    write_reference_shard(str(prefix / "000.tar"), [f"a{i}" for i in range(5)])
    write_reference_shard(str(prefix / "001.tar"), [f"b{i}" for i in range(6)], seed=1)
    shards = index_shards([str(prefix)])
    assert [(s.bucket, s.num_samples, s.latent_channels) for s in shards] == [("8x8", 5, 4), ("8x8", 6, 4)]
    batch = take(stream(shards), 1)[0]
    assert batch["latent"].shape == (4, 4, 8, 8)
    assert batch["text_mask"].sum() == sum(1 + int(caption[-1]) % 3 for caption in batch["captions"])


def test_holdout_keeps_the_last_shards_out_of_training(cache):
    shards = index_shards([cache[0]])
    train, held = split_holdout(shards, 2)
    assert train + held == shards and held == shards[-2:]
    with pytest.raises(ValueError, match="holdout_shards=6"):
        split_holdout(shards, 6)


def test_a_bucket_with_fewer_shards_than_ranks_is_split_by_sample_not_dropped(tmp_path):
    root = str(tmp_path / "small")
    write_tiny_cache(root, shard_sizes=[10])
    shards = index_shards([root])
    plans = [epoch_plan(shards, seed=0, epoch=0, rank=r, world_size=2, batch_per_rank=2, window_shards=2)
             for r in range(2)]
    seen = [{a for batch in plan for a in batch.addresses} for plan in plans]
    assert len(plans[0]) == len(plans[1]) == 2
    assert not seen[0] & seen[1]
