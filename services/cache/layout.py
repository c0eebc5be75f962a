"""Where each part of a latent cache lives under its output prefix."""

from __future__ import annotations

import re

from services import storage
from services.cache.names import safe_stem

MANIFEST = "manifest.json"
PLAN = "_plan.json"
PROGRESS_DIR = "_progress"
SHARDS_DIR = "shards"
NULL_TEXT = "null_text.npy"
# The encode job's writer lease: `_lease.json`, or `_lease.<index>-of-<count>.json` for a partition of the units.
LEASE_FILE = re.compile(r"^_lease(?:\.(?P<index>\d+)-of-(?P<count>\d+))?\.json$")


def bucket_name(height: int, width: int) -> str:
    """The aspect bucket of a latent: its spatial shape `"{h}x{w}"`."""
    return f"{height}x{width}"


def bucket_size(bucket: str) -> tuple[int, int]:
    """(h, w) of a bucket name: the inverse of `bucket_name`."""
    height, width = (int(side) for side in bucket.split("x"))
    return height, width


def manifest_uri(out_uri: str) -> str:
    return storage.join(out_uri, MANIFEST)


def plan_uri(out_uri: str) -> str:
    return storage.join(out_uri, PLAN)


def progress_dir_uri(out_uri: str) -> str:
    return storage.join(out_uri, PROGRESS_DIR)


def progress_uri(out_uri: str, unit: str) -> str:
    return storage.join(out_uri, PROGRESS_DIR, f"{safe_stem(unit)}.json")


def null_text_uri(out_uri: str) -> str:
    return storage.join(out_uri, NULL_TEXT)


def shard_path(bucket: str, unit: str, index: int) -> str:
    """A shard's path relative to the cache root: `shards/<bucket>/<unit>-NNNN.tar`."""
    return f"{SHARDS_DIR}/{bucket}/{safe_stem(unit)}-{index:04d}.tar"
