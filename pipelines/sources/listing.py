"""Turning the URIs a config names (files, brace ranges, globs, prefixes) into sorted object lists."""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re

from braceexpand import braceexpand
from fsspec.core import split_protocol

from services import storage
from services.cache.names import safe_stem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_WILDCARD = re.compile(r"[*?\[]")


def absolute_uri(uri: str) -> str:
    """Bare relative paths made absolute, because storage listings return absolute paths."""
    return uri if split_protocol(uri)[0] is not None else os.path.abspath(os.path.expanduser(uri))


def _glob(pattern: str) -> list[str]:
    # fnmatch's `*` also crosses `/`, so listing everything below the fixed part covers any depth.
    fixed = pattern[: _WILDCARD.search(pattern).start()]
    base = fixed[: fixed.rfind("/") + 1] or "."
    return [uri for uri in storage.list_uris(base, recursive=True) if fnmatch.fnmatchcase(uri, pattern)]


def expand_uris(patterns: list[str], suffix: str) -> list[str]:
    """Every `suffix` file named by explicit URIs, `{000..009}` ranges, globs or prefixes, without repeats."""
    found: list[str] = []
    for pattern in patterns:
        matches: list[str] = []
        for item in braceexpand(absolute_uri(pattern)):
            if _WILDCARD.search(item):
                matches += _glob(item)
            elif item.endswith(suffix):
                matches.append(item)
            else:
                matches += [uri for uri in storage.list_uris(item, recursive=True) if uri.endswith(suffix)]
        if not matches:
            raise ValueError(f"{pattern!r} names no {suffix} files: check the path, pattern or prefix")
        found += [uri for uri in matches if uri not in found]
    return found


def file_unit_name(uri: str) -> str:
    """`.../synthetic_x/train-000012.tar` -> `synthetic_x__train-000012`: parent folder and stem."""
    path = split_protocol(uri)[1].rstrip("/")
    stem = posixpath.basename(path).split(".", 1)[0]
    parent = posixpath.basename(posixpath.dirname(path))
    return safe_stem(f"{parent}__{stem}" if parent else stem)


def unique_unit_names(uris: list[str]) -> dict[str, str]:
    """uri -> unit name, refusing two files that would write to the same outputs."""
    names: dict[str, str] = {}
    owner: dict[str, str] = {}
    for uri in uris:
        name = file_unit_name(uri)
        if name in owner:
            raise ValueError(
                f"{owner[name]} and {uri} both map to unit name {name!r}: list them from separate jobs "
                "or rename one folder"
            )
        owner[name] = uri
        names[uri] = name
    return names


def list_relative_files(root: str, suffixes: tuple[str, ...]) -> list[str]:
    """Sorted paths below `root`, relative to it, whose lower-cased name ends with one of `suffixes`."""
    root = absolute_uri(root).rstrip("/")
    return sorted(
        uri[len(root) + 1 :]
        for uri in storage.list_uris(root, recursive=True)
        if uri.lower().endswith(suffixes) and uri.startswith(root + "/")
    )


def join_relative(root: str, relative: str) -> str:
    return f"{absolute_uri(root).rstrip('/')}/{relative}"


def chunks(items: list, size: int) -> list[list]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def key_from_relative(relative: str) -> str:
    """`cats/img_01.jpg` -> `cats__img_01`: a sample key that keeps the folder and stays file-stem-safe."""
    return safe_stem(posixpath.splitext(relative)[0].replace("/", "__"))
