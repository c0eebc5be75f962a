"""The install step is idempotent: once .venv matches pyproject.toml, bootstrapping again installs nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAMP = REPO / ".venv" / ".installed"


@pytest.mark.skipif(not STAMP.exists(), reason="runs only in a checkout bootstrapped by scripts/bootstrap.sh")
def test_second_bootstrap_installs_nothing():
    before = STAMP.stat().st_mtime_ns
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert STAMP.stat().st_mtime_ns == before
