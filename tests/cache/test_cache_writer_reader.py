from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from webdataset import TarWriter

from services.cache import layout
from services.cache.reader import (
    CorruptCacheError,
    SkipCounter,
    collate,
    load_null_text,
    pad_text,
    read_samples,
)
from services.cache.schema import encode_sample
from services.cache.writer import UnitShardWriter, write_null_text

SQUARE = (4, 8, 8)
WIDE = (4, 4, 6)


def write_unit(out: str, make_sample, unit: str = "part/train-000001.tar", **limits) -> list:
    """5 square and 3 wide samples, at most 2 per shard unless told otherwise."""
    limits.setdefault("max_samples_per_shard", 2)
    with UnitShardWriter(out, unit, latent_dtype="fp16", text_dtype="int8", **limits) as writer:
        for i in range(8):
            shape = SQUARE if i < 5 else WIDE
            writer.write(make_sample(f"s{i}", latent_shape=shape, tokens=3 + i, seed=i))
    return writer.close()


def shard_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "shards").rglob("*") if p.is_file())


def read_all(uris, handler: SkipCounter | None = None) -> list:
    return list(read_samples(uris, handler))


def test_writer_puts_each_bucket_in_its_own_numbered_shards(tmp_path, make_sample):
    shards = write_unit(str(tmp_path), make_sample)
    stem = "part_train-000001_tar-"
    assert [(s.bucket, s.num_samples) for s in shards] == [
        ("4x6", 2),
        ("4x6", 1),
        ("8x8", 2),
        ("8x8", 2),
        ("8x8", 1),
    ]
    assert all(s.path.startswith(f"shards/{s.bucket}/{stem}") and s.path.endswith(".tar") for s in shards)
    assert [s.path[-8:] for s in shards] == ["0000.tar", "0001.tar", "0000.tar", "0001.tar", "0002.tar"]
    assert shard_files(tmp_path) == [s.path for s in shards]


def test_rerunning_a_unit_overwrites_the_same_shards_with_identical_bytes(tmp_path, make_sample):
    first = write_unit(str(tmp_path), make_sample)
    second = write_unit(str(tmp_path), make_sample)
    assert first == second
    assert shard_files(tmp_path) == [s.path for s in first]


def test_reader_returns_every_written_sample_with_its_shard_position(tmp_path, make_sample):
    shards = write_unit(str(tmp_path), make_sample)
    samples = read_all([str(tmp_path / s.path) for s in shards])
    assert sorted(s.key for s in samples) == [f"s{i}" for i in range(8)]
    assert [s.position for s in samples] == [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0)]
    s6 = next(s for s in samples if s.key == "s6")
    expected = make_sample("s6", latent_shape=WIDE, tokens=9, seed=6)
    np.testing.assert_array_equal(s6.latent, expected.latent.astype(np.float16).astype(np.float32))
    assert s6.text.shape == (9, 16) and s6.caption == expected.caption


def cut_in_the_middle(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])


def test_truncated_shard_is_counted_and_the_other_shards_are_read(tmp_path, make_sample):
    uris = [str(tmp_path / s.path) for s in write_unit(str(tmp_path), make_sample)]
    cut_in_the_middle(Path(uris[2]))  # the first 8x8 shard: s0, s1
    counter = SkipCounter()
    keys = {s.key for s in read_all(uris, handler=counter)}
    assert {"s2", "s3", "s4", "s5", "s6", "s7"} <= keys and "s1" not in keys
    assert counter.counts["truncated_shard"] == 1


def test_garbled_shard_is_skipped_and_counted_as_unreadable(tmp_path, make_sample):
    uris = [str(tmp_path / s.path) for s in write_unit(str(tmp_path), make_sample)]
    Path(uris[0]).write_bytes(np.random.default_rng(0).bytes(4096))
    counter = SkipCounter()
    keys = {s.key for s in read_all(uris, handler=counter)}
    assert keys == {"s0", "s1", "s2", "s3", "s4", "s7"}  # s5, s6 were in the garbled 4x6 shard
    assert counter.counts == {"unreadable_shard": 1}


@pytest.mark.parametrize("damage", ["cut", "garble"])
def test_damaged_shard_raises_when_failing_fast(tmp_path, make_sample, damage):
    uris = [str(tmp_path / s.path) for s in write_unit(str(tmp_path), make_sample)]
    if damage == "cut":
        cut_in_the_middle(Path(uris[2]))
    else:
        Path(uris[2]).write_bytes(b"not a tar" * 100)
    with pytest.raises(CorruptCacheError, match=Path(uris[2]).name):
        read_all(uris, handler=SkipCounter(fail_fast=True))


def test_sample_with_a_missing_file_and_a_missing_shard_are_counted(tmp_path, make_sample):
    bad = tmp_path / "bad.tar"
    with TarWriter(str(bad), encoder=False) as tar:
        tar.write(encode_sample(make_sample("good"), latent_dtype="fp16", text_dtype="fp16"))
        broken = encode_sample(make_sample("broken"), latent_dtype="fp16", text_dtype="fp16")
        del broken["text.npy"]
        tar.write(broken)
    counter = SkipCounter()
    samples = read_all([str(bad), str(tmp_path / "gone.tar")], handler=counter)
    assert [s.key for s in samples] == ["good"]
    assert counter.counts == {"corrupt_sample": 1, "missing_shard": 1}


def test_writer_that_fails_mid_unit_leaves_no_shard_behind(tmp_path, make_sample):
    with pytest.raises(RuntimeError, match="encoder died"):
        with UnitShardWriter(str(tmp_path), "u", latent_dtype="fp16", text_dtype="fp16") as writer:
            writer.write(make_sample("a"))
            raise RuntimeError("encoder died")
    assert not (tmp_path / "shards").exists()


def test_writer_starts_a_new_shard_once_the_byte_limit_is_reached(tmp_path, make_sample):
    shards = write_unit(str(tmp_path), make_sample, max_samples_per_shard=100, max_shard_bytes=1)
    assert [s.num_samples for s in shards] == [1] * 8


def test_collate_pads_text_to_the_longest_and_masks_real_tokens(make_sample):
    batch = collate([make_sample("a", tokens=3), make_sample("b", tokens=5)])
    assert batch["latent"].shape == (2, *SQUARE) and batch["latent"].dtype == torch.float32
    assert batch["text"].shape == (2, 5, 16) and batch["text_mask"].dtype == torch.bool
    assert batch["text_mask"].sum(1).tolist() == [3, 5]
    assert torch.all(batch["text"][0, 3:] == 0) and torch.all(batch["text"][1, :5] != 0)
    assert batch["keys"] == ["a", "b"]


def test_padding_texts_that_are_all_empty_keeps_one_masked_slot():
    text, mask = pad_text([np.zeros((0, 16), np.float32)] * 2)
    assert text.shape == (2, 1, 16) and not mask.any()


def test_collate_refuses_a_batch_mixing_buckets(make_sample):
    with pytest.raises(ValueError, match="batch each bucket separately"):
        collate([make_sample("a", latent_shape=SQUARE), make_sample("b", latent_shape=WIDE)])


def test_null_text_round_trips_as_float32(tmp_path):
    null = np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32)
    write_null_text(str(tmp_path), null)
    assert os.path.exists(tmp_path / "null_text.npy")
    np.testing.assert_array_equal(load_null_text(layout.null_text_uri(str(tmp_path))), null)


def test_collate_stacks_pixels_and_gives_a_sample_without_them_a_black_image(make_sample):
    samples = [make_sample(f"k{i}", seed=i) for i in range(3)]
    for sample in samples[:2]:
        sample.pixels = np.full((64, 64, 3), 200, np.uint8)
    batch = collate(samples)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (3, 64, 64, 3)
    assert int(batch["pixels"][:2].min()) == 200 and int(batch["pixels"][2].max()) == 0
    assert "pixels" not in collate(samples[2:])
