"""Deterministic per-rank streaming of the latent cache, with a data position for exact resume.

A rank's epoch is a plan computed from the shard index alone (URIs, buckets, sample counts), so
every rank knows every rank's share without reading a byte:
1. per aspect bucket, shards are permuted by (seed, epoch, bucket) and dealt to ranks round-robin
   (a bucket with fewer shards than ranks is split by sample index instead);
2. per rank, windows of `shuffle_window_shards` consecutive shards have their sample addresses
   shuffled together (the shuffle buffer: a window is read whole, then released);
3. addresses are cut into batches of one bucket; every rank keeps the same number of batches per
   bucket (the minimum over ranks) and drops its remainder, so DDP ranks never wait on each other;
4. the buckets' batches are interleaved in one seeded order shared by all ranks.
The data position is (epoch, batches consumed in it). Resuming rebuilds the plan and skips the
consumed batches without reading the shards before them: no sample is repeated or skipped.

Each shard's bytes are checked against the size and sha256 its cache's manifest records before
any sample is used (bare shards without a manifest have no recorded checksum: logged once, read
unchecked). An address whose sample cannot be read (corrupt sample, unreadable or missing shard,
checksum mismatch) keeps its slot as a zero-weight placeholder, counted by reason and logged, so
the batch shape and the number of steps stay equal on every rank; `fail_on_corrupt` raises instead.
A storage failure is not bad data and never becomes a placeholder: `services.storage` waits out an
unreachable server up to its retry deadline, and then the stream raises and fails the job.
"""

from __future__ import annotations

import logging
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np
import torch

from services import storage
from services.cache import layout, manifest, reader
from services.cache.schema import CacheFormatError, CacheSample, decode_sample
from trainer.config import DataConfig

logger = logging.getLogger(__name__)

Address = tuple[int, int]  # (shard id in the index, sample index within the shard)
PLACEHOLDER_KEY = ""
DEFAULT_BATCH_TIMEOUT_S = DataConfig.model_fields["batch_timeout_s"].default


class DataTimeoutError(RuntimeError):
    """A batch's data did not arrive within `data.batch_timeout_s`: the step fails rather than hang the group."""


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the training set: where it is, its bucket, how many samples the index says it holds and,
    from a manifest, its recorded size and sha256 (None for bare shards)."""

    uri: str
    bucket: str
    num_samples: int
    latent_channels: int
    num_bytes: int | None = None
    sha256: str | None = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.latent_channels, *layout.bucket_size(self.bucket)


@dataclass(frozen=True)
class PlannedBatch:
    """One step's samples on one rank: all from one bucket."""

    bucket: str
    addresses: tuple[Address, ...]


@dataclass(frozen=True)
class DataPosition:
    """Where a run is in its data: `batches` of epoch `epoch` are done (for this world size and batch)."""

    epoch: int
    batches: int
    world_size: int
    batch_per_rank: int

    def to_json(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches": self.batches, "world_size": self.world_size,
                "batch_per_rank": self.batch_per_rank}

    @classmethod
    def from_json(cls, data: dict[str, int]) -> DataPosition:
        return cls(**{name: int(data[name]) for name in ("epoch", "batches", "world_size", "batch_per_rank")})


# --------------------------------------------------------------------------- the shard index


def _is_shard_uri(uri: str) -> bool:
    return uri.endswith(".tar")


def _index_manifest_cache(root: str) -> list[ShardEntry]:
    card = manifest.read_manifest(root)
    return [
        ShardEntry(storage.join(root, shard.path), shard.bucket, shard.num_samples, card.latent_channels,
                   shard.num_bytes, shard.sha256)
        for shard in card.shards
        if shard.num_samples > 0
    ]


def _index_bare_shard(uri: str, fail_on_corrupt: bool) -> ShardEntry | None:
    """Count a shard without a manifest (reference layout) by reading it once; None if it holds nothing readable."""
    first: CacheSample | None = None
    count = 0
    for sample in reader.read_samples([uri], reader.SkipCounter(fail_fast=fail_on_corrupt)):
        first = first or sample
        count = sample.position[1] + 1
    if first is None:
        logger.warning("shard %s holds no readable sample: left out of the index", uri)
        return None
    channels, height, width = first.latent.shape
    return ShardEntry(uri, layout.bucket_name(height, width), count, channels)


def index_shards(uris: Sequence[str], *, fail_on_corrupt: bool = False) -> list[ShardEntry]:
    """The shards behind `uris`: cache roots with a manifest, shard URIs, or prefixes of bare .tar shards."""
    entries: list[ShardEntry] = []
    for uri in uris:
        if _is_shard_uri(uri):
            found = [_index_bare_shard(uri, fail_on_corrupt)]
        elif storage.exists(layout.manifest_uri(uri)):
            found = _index_manifest_cache(uri)
        else:
            tars = [item for item in storage.list_uris(uri, recursive=True) if _is_shard_uri(item)]
            if not tars:
                raise FileNotFoundError(
                    f"{uri} has neither {layout.MANIFEST} nor .tar shards: give a latent cache written by the "
                    "encode job, a prefix of cache shards, or shard URIs"
                )
            found = [_index_bare_shard(tar, fail_on_corrupt) for tar in tars]
        entries.extend(entry for entry in found if entry is not None)
    unchecked = [entry.uri for entry in entries if entry.sha256 is None]
    if unchecked:
        logger.warning("%d of %d shards come without a manifest (e.g. %s): no recorded sha256, so they are read "
                       "without a checksum check", len(unchecked), len(entries), unchecked[0])
    return entries


def select_buckets(shards: Sequence[ShardEntry], buckets: Sequence[str] | None) -> list[ShardEntry]:
    if buckets is None:
        return list(shards)
    known = {shard.bucket for shard in shards}
    unknown = sorted(set(buckets) - known)
    if unknown:
        raise ValueError(f"data.buckets {unknown} are not in the cache (it has {sorted(known)})")
    return [shard for shard in shards if shard.bucket in buckets]


def split_holdout(shards: Sequence[ShardEntry], holdout: int) -> tuple[list[ShardEntry], list[ShardEntry]]:
    """(training shards, the last `holdout` shards kept for validation)."""
    if holdout >= len(shards):
        raise ValueError(f"validation.holdout_shards={holdout} leaves no training shard out of {len(shards)}")
    cut = len(shards) - holdout
    return list(shards[:cut]), list(shards[cut:])


# --------------------------------------------------------------------------- the epoch plan


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng([int(word) for word in words])


def _bucket_salt(bucket: str) -> int:
    return zlib.crc32(bucket.encode())


ShardSlice = tuple[int, int, int]  # (shard id, first sample, stride): the samples of a shard one rank reads


def _deal_shards(shards: Sequence[ShardEntry], seed: int, epoch: int,
                 world_size: int) -> dict[str, list[list[ShardSlice]]]:
    """bucket -> per-rank shard slices, from a per-(seed, epoch, bucket) permutation dealt round-robin.

    A bucket with fewer shards than ranks is split by sample index instead (every rank reads its
    shards, keeping every world_size-th sample), so that small buckets are not dropped.
    """
    by_bucket: dict[str, list[int]] = {}
    for shard_id, shard in enumerate(shards):
        by_bucket.setdefault(shard.bucket, []).append(shard_id)
    dealt = {}
    for bucket, ids in sorted(by_bucket.items()):
        order = [ids[i] for i in _rng(seed, epoch, _bucket_salt(bucket)).permutation(len(ids))]
        if len(order) >= world_size:
            dealt[bucket] = [[(shard_id, 0, 1) for shard_id in order[rank::world_size]] for rank in range(world_size)]
        else:
            dealt[bucket] = [[(shard_id, rank, world_size) for shard_id in order] for rank in range(world_size)]
    return dealt


def _slice_size(shards: Sequence[ShardEntry], piece: ShardSlice) -> int:
    shard_id, first, stride = piece
    return len(range(first, shards[shard_id].num_samples, stride))


def _shuffled_addresses(shards: Sequence[ShardEntry], pieces: list[ShardSlice], seed: int, epoch: int,
                        window_shards: int) -> list[Address]:
    """Sample addresses of a rank's shard slices, shuffled within windows of `window_shards` shards."""
    addresses: list[Address] = []
    for start in range(0, len(pieces), window_shards):
        window = pieces[start:start + window_shards]
        pool = [(shard_id, i) for shard_id, first, stride in window
                for i in range(first, shards[shard_id].num_samples, stride)]
        order = _rng(seed, epoch, window[0][0], window[0][1], 1).permutation(len(pool))
        addresses.extend(pool[i] for i in order)
    return addresses


def epoch_plan(shards: Sequence[ShardEntry], *, seed: int, epoch: int, rank: int, world_size: int,
               batch_per_rank: int, window_shards: int) -> list[PlannedBatch]:
    """Rank `rank`'s batches of one epoch; every rank gets the same number and the same bucket per step."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size}")
    per_bucket: dict[str, list[PlannedBatch]] = {}
    for bucket, ranks in _deal_shards(shards, seed, epoch, world_size).items():
        counts = [sum(_slice_size(shards, piece) for piece in pieces) for pieces in ranks]
        num_batches = min(counts) // batch_per_rank
        addresses = _shuffled_addresses(shards, ranks[rank], seed, epoch, window_shards)
        per_bucket[bucket] = [
            PlannedBatch(bucket, tuple(addresses[i * batch_per_rank:(i + 1) * batch_per_rank]))
            for i in range(num_batches)
        ]
    slots = [bucket for bucket, batches in per_bucket.items() for _ in batches]
    slots = [slots[i] for i in _rng(seed, epoch, 2).permutation(len(slots))]
    cursors = Counter[str]()
    plan = []
    for bucket in slots:
        plan.append(per_bucket[bucket][cursors[bucket]])
        cursors[bucket] += 1
    return plan


def steps_per_epoch(shards: Sequence[ShardEntry], *, world_size: int, batch_per_rank: int, seed: int,
                    window_shards: int) -> int:
    """Steps in epoch 0 (later epochs deal shards differently and may differ by a few steps)."""
    steps = len(epoch_plan(shards, seed=seed, epoch=0, rank=0, world_size=world_size,
                           batch_per_rank=batch_per_rank, window_shards=window_shards))
    if steps == 0:
        total = sum(shard.num_samples for shard in shards)
        raise ValueError(
            f"{len(shards)} shards with {total} samples give no full batch of {batch_per_rank} on each of "
            f"{world_size} ranks: use a smaller batch_size, fewer workers, or a bigger cache"
        )
    return steps


def rescale_position(position: DataPosition, world_size: int, batch_per_rank: int,
                     batches_in_epoch: int) -> DataPosition:
    """A position saved under another world size or batch: keep the fraction of the epoch done (approximate)."""
    if (position.world_size, position.batch_per_rank) == (world_size, batch_per_rank):
        return position
    saved_samples = position.batches * position.world_size * position.batch_per_rank
    batches = min(batches_in_epoch, saved_samples // (world_size * batch_per_rank))
    logger.warning(
        "the checkpoint's data position was saved with %d workers x %d per rank; this run has %d x %d: "
        "continuing epoch %d at batch %d (the sample order differs from an uninterrupted run)",
        position.world_size, position.batch_per_rank, world_size, batch_per_rank, position.epoch, batches,
    )
    return DataPosition(position.epoch, batches, world_size, batch_per_rank)


# --------------------------------------------------------------------------- reading the plan


class _ShardLoad:
    """One shard's samples, kept undecoded (views into the fetched shard) until a batch takes them.

    Held in that form, a shuffle window costs the shards' bytes rather than their float32 arrays
    (for int8 text about a quarter of the memory).
    """

    def __init__(self, entry: ShardEntry, fail_on_corrupt: bool) -> None:
        handler = reader.SkipCounter(fail_fast=fail_on_corrupt)
        self.raw: dict[int, dict] = dict(reader.read_shard(entry.uri, handler, num_bytes=entry.num_bytes,
                                                           sha256=entry.sha256))
        # Why a planned index has no sample: the shard-level failure, if any.
        failures = [reason for reason in ("checksum_mismatch", "missing_shard", "unreadable_shard", "truncated_shard")
                    if handler.counts[reason]]
        self.missing_reason = failures[0] if failures else "missing_sample"


class CacheStream:
    """One rank's batches of one epoch, from `start_batch` on, with shards read ahead in threads.

    Each batch carries `placeholders`: how many of its samples were replaced by a zero-weight
    placeholder, by reason (the consumer sums them, whichever process built the batch).
    """

    def __init__(self, shards: Sequence[ShardEntry], plan: Sequence[PlannedBatch], *, start_batch: int = 0,
                 placeholder_text: np.ndarray, prefetch_shards: int = 2, fail_on_corrupt: bool = False,
                 batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S) -> None:
        self.shards = list(shards)
        self.plan = list(plan[start_batch:])
        self.prefetch_shards = prefetch_shards
        self.fail_on_corrupt = fail_on_corrupt
        self.placeholder_text = placeholder_text
        self.batch_timeout_s = batch_timeout_s

    def _need_order(self) -> tuple[list[int], Counter[int]]:
        """Shard ids in the order batches first touch them, and how many planned samples each still serves."""
        order: dict[int, None] = {}
        uses: Counter[int] = Counter()
        for batch in self.plan:
            for shard_id, _ in batch.addresses:
                order.setdefault(shard_id)
                uses[shard_id] += 1
        return list(order), uses

    def __iter__(self) -> Iterator[dict]:
        order, uses = self._need_order()
        first_batch_of = {}
        for index, batch in enumerate(self.plan):
            for shard_id, _ in batch.addresses:
                first_batch_of.setdefault(shard_id, index)
        loads: dict[int, Future[_ShardLoad]] = {}
        next_to_submit = 0
        pool = ThreadPoolExecutor(max_workers=max(1, self.prefetch_shards), thread_name_prefix="cache-read")
        stuck = False
        try:
            for index, batch in enumerate(self.plan):
                # Submit every shard this batch needs, and keep `prefetch_shards` more read ahead.
                while next_to_submit < len(order) and (
                    first_batch_of[order[next_to_submit]] <= index
                    or sum(1 for s in loads if first_batch_of[s] > index) < self.prefetch_shards
                ):
                    shard_id = order[next_to_submit]
                    loads[shard_id] = pool.submit(_ShardLoad, self.shards[shard_id], self.fail_on_corrupt)
                    next_to_submit += 1
                samples, weights, placeholders = [], [], Counter[str]()
                for shard_id, sample_index in batch.addresses:
                    sample, failure = self._sample(self._loaded(loads[shard_id], shard_id), shard_id, sample_index)
                    if failure is not None:
                        placeholders[failure] += 1
                    samples.append(sample)
                    weights.append(0.0 if sample.key == PLACEHOLDER_KEY else 1.0)
                    uses[shard_id] -= 1
                    if uses[shard_id] == 0:
                        del loads[shard_id]  # the window moved on: release the shard's samples
                collated = reader.collate(samples)
                collated["weights"] = torch.tensor(weights)
                collated["bucket"] = batch.bucket
                collated["placeholders"] = dict(placeholders)
                yield collated
        except DataTimeoutError:
            stuck = True
            raise
        finally:
            for future in loads.values():
                future.cancel()
            pool.shutdown(wait=not stuck, cancel_futures=True)  # a stuck read's thread is left behind

    def _loaded(self, load: Future[_ShardLoad], shard_id: int) -> _ShardLoad:
        try:
            return load.result(timeout=self.batch_timeout_s)
        except FutureTimeout:
            raise DataTimeoutError(
                f"{self.shards[shard_id].uri} was not read within data.batch_timeout_s={self.batch_timeout_s} s "
                "(storage stalled?): failing the step instead of hanging every rank") from None

    def _sample(self, load: _ShardLoad, shard_id: int, sample_index: int) -> tuple[CacheSample, str | None]:
        """The decoded sample, or a placeholder and the reason it stands in."""
        raw = load.raw.get(sample_index)
        if raw is None:
            return self._placeholder(shard_id, sample_index, load.missing_reason, None), load.missing_reason
        try:
            sample = decode_sample(raw)
            expected = self.shards[shard_id].latent_shape
            if sample.latent.shape != expected or sample.text.shape[1] != self.placeholder_text.shape[1]:
                raise CacheFormatError(
                    f"latent {sample.latent.shape} and text width {sample.text.shape[1]} do not match the shard's "
                    f"bucket {expected} and the cache's text width {self.placeholder_text.shape[1]}")
            return sample, None
        except CacheFormatError as error:
            return self._placeholder(shard_id, sample_index, "corrupt_sample", error), "corrupt_sample"

    def _placeholder(self, shard_id: int, sample_index: int, reason: str, error: Exception | None) -> CacheSample:
        entry = self.shards[shard_id]
        where = f"sample {sample_index} of {entry.uri}"
        if self.fail_on_corrupt:
            raise reader.CorruptCacheError(f"{where}: {reason} (data.fail_on_corrupt=true)") from error
        logger.warning("skipped %s (%s%s): trained as a zero-weight placeholder", where, reason,
                       f": {error}" if error else "")
        return CacheSample(PLACEHOLDER_KEY, np.zeros(entry.latent_shape, np.float32), self.placeholder_text, "", {})


class TrainingStream:
    """A rank's batches over epochs, from a saved data position on, tracking the position after each batch.

    With `loader_process` the batches are read, decoded and collated in a DataLoader worker process
    (spawned: the training process may hold CUDA and Ray threads), so the training loop's Python
    never competes with decoding for the GIL; each batch carries its data position and placeholder
    counts back, and `position`/`skipped` here follow the batches as they are consumed.
    """

    def __init__(self, shards: Sequence[ShardEntry], *, seed: int, rank: int, world_size: int, batch_per_rank: int,
                 window_shards: int, placeholder_text: np.ndarray, prefetch_shards: int = 2,
                 fail_on_corrupt: bool = False, start: DataPosition | None = None, loader_process: bool = False,
                 prefetch_batches: int = 4, batch_timeout_s: float = DEFAULT_BATCH_TIMEOUT_S) -> None:
        self.shards = list(shards)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batch_per_rank, self.window_shards = batch_per_rank, window_shards
        self.prefetch_shards, self.fail_on_corrupt = prefetch_shards, fail_on_corrupt
        self.placeholder_text = placeholder_text
        self.loader_process, self.prefetch_batches = loader_process, prefetch_batches
        self.batch_timeout_s = batch_timeout_s
        self.position = start or DataPosition(0, 0, world_size, batch_per_rank)
        # Samples replaced by a zero-weight placeholder, by reason.
        self.skipped: Counter[str] = Counter()

    def plan(self, epoch: int) -> list[PlannedBatch]:
        return epoch_plan(self.shards, seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                          batch_per_rank=self.batch_per_rank, window_shards=self.window_shards)

    def produce(self) -> Iterator[dict]:
        """The batches from `position` on, each tagged with the `data_position` reached once it is trained."""
        epoch = self.position.epoch
        plan = self.plan(epoch)
        start = rescale_position(self.position, self.world_size, self.batch_per_rank, len(plan)).batches
        while True:
            stream = CacheStream(self.shards, plan, start_batch=start, prefetch_shards=self.prefetch_shards,
                                 fail_on_corrupt=self.fail_on_corrupt, placeholder_text=self.placeholder_text,
                                 batch_timeout_s=self.batch_timeout_s)
            for done, batch in enumerate(stream, start=start + 1):
                batch["data_position"] = DataPosition(epoch, done, self.world_size, self.batch_per_rank).to_json()
                yield batch
            epoch, start = epoch + 1, 0
            plan = self.plan(epoch)

    def __iter__(self) -> Iterator[dict]:
        if not self.loader_process:
            yield from self._consume(self.produce())
            return
        # The worker's own shard timeout names the stuck shard; this one is the backstop for a worker stuck
        # anywhere else (twice as long, so that the worker's clearer error arrives first).
        loader = torch.utils.data.DataLoader(
            _ProducedBatches(self), batch_size=None, collate_fn=_as_sent, num_workers=1,
            multiprocessing_context="spawn", prefetch_factor=self.prefetch_batches, timeout=2 * self.batch_timeout_s)
        batches = iter(loader)
        try:
            yield from self._consume(_tensors_from_numpy(batch) for batch in _within_timeout(batches))
        finally:
            del batches  # shuts the worker process down now rather than at garbage collection

    def _consume(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            self.position = DataPosition.from_json(batch.pop("data_position"))
            self.skipped.update(batch.pop("placeholders"))
            yield batch


class _ProducedBatches(torch.utils.data.IterableDataset):
    """A TrainingStream's `produce()` as a dataset, for its DataLoader worker process.

    Tensors travel as numpy arrays: pickled through the worker's pipe in one copy, where a tensor
    would cost a shared-memory file and a file-descriptor round trip to the busy worker each.
    """

    def __init__(self, stream: TrainingStream) -> None:
        super().__init__()
        self.stream = stream

    def __iter__(self) -> Iterator[dict]:
        for batch in self.stream.produce():
            yield {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in batch.items()}


def _within_timeout(batches: Iterator[dict]) -> Iterator[dict]:
    """The loader's batches, its timeout turned into a DataTimeoutError (torch raises a bare RuntimeError)."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except DataTimeoutError:  # the worker's own, naming the stuck shard
            raise
        except RuntimeError as error:
            if "timed out" not in str(error):
                raise
            raise DataTimeoutError(f"the loader process sent no batch within 2 x data.batch_timeout_s: {error}") from error
        yield batch


def _as_sent(batch: dict) -> dict:
    """The DataLoader's per-item conversion, turned off: its default would make tensors of the arrays again."""
    return batch


def _tensors_from_numpy(batch: dict) -> dict:
    return {name: torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            for name, value in batch.items()}
