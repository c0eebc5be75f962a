"""infra.local.credentials.make_private_dir: the local stack's folders are their owner's alone."""

from __future__ import annotations

import os

from infra.local.credentials import make_private_dir


def test_new_folder_and_its_missing_parents_exist_and_the_folder_is_0700_whatever_the_umask(tmp_path):
    previous = os.umask(0)
    try:
        make_private_dir(tmp_path / "a" / "b")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "a" / "b").stat().st_mode & 0o777) == "0o700"


def test_existing_open_folder_is_closed(tmp_path):
    folder = tmp_path / "stack"
    folder.mkdir()
    folder.chmod(0o777)
    (folder / "kept").write_text("x")
    make_private_dir(folder)
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert (folder / "kept").read_text() == "x"
