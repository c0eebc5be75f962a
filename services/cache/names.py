"""Deterministic, storage-safe names for units and sample keys."""

from __future__ import annotations

import hashlib
import re

_SAFE = re.compile(r"^[A-Za-z0-9_-]+$")
_UNSAFE_RUN = re.compile(r"[^A-Za-z0-9_-]+")
_MAX_STEM = 96


def safe_stem(name: str) -> str:
    """A deterministic file stem for a unit name or source id, safe in tar members and S3 keys.

    Rule: a name made only of `[A-Za-z0-9_-]` (at most 96 characters) is kept as is. Otherwise every
    run of other characters becomes `_`, the result is cut to 96 characters, and `-` plus the first
    10 hex digits of the SHA-1 of the original name are appended, so two different names never share
    a stem by accident (`a/b.tar` -> `a_b_tar-<hash>`, `a_b_tar` stays `a_b_tar`). Dots are never kept
    because WebDataset splits a member name into key and extension at the first dot.
    """
    if not name:
        raise ValueError("an empty name cannot become a file stem")
    if _SAFE.match(name) and len(name) <= _MAX_STEM:
        return name
    digest = hashlib.sha1(name.encode("utf-8")).hexdigest()[:10]
    return f"{_UNSAFE_RUN.sub('_', name)[:_MAX_STEM]}-{digest}"


def is_safe_stem(name: str) -> bool:
    return bool(_SAFE.match(name))
