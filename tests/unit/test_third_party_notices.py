"""Job logs carry no third-party notice that the project's pins make harmless, and nothing else is hidden."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.third_party_notices import HARMLESS_NOTICES, QUIET_TORCHAO_ENV, DropNotice

REPO = Path(__file__).resolve().parents[2]


def import_torchao(prelude: str) -> str:
    env = {**os.environ, **QUIET_TORCHAO_ENV}
    done = subprocess.run([sys.executable, "-c", f"{prelude}import torchao"], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=300, check=True)  # fmt: skip
    return done.stdout + done.stderr


@pytest.mark.parametrize("prelude", ["", "import services; "], ids=["bare", "project"])
def test_torchao_import_notices_appear_only_without_the_project(prelude):
    """The bare import shows why the filters exist (when a release drops a notice, remove its filter)."""
    output = import_torchao(prelude)
    for wording in HARMLESS_NOTICES.values():
        assert (wording in output) == (prelude == ""), output[-2000:]


def test_the_filter_keeps_every_other_message_of_the_same_logger():
    keep = logging.LogRecord("torchao", logging.WARNING, __file__, 1, "Failed to load %s", ("x.so",), None)
    drop = logging.LogRecord("torchao", logging.WARNING, __file__, 1, HARMLESS_NOTICES["torchao"], (), None)
    notice = DropNotice(HARMLESS_NOTICES["torchao"])
    assert notice.filter(keep) and not notice.filter(drop)
