"""The install step: quiet on a fresh clone, and idempotent (once .venv matches pyproject.toml, it installs nothing)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
STAMP = REPO / ".venv" / ".installed"
BOOTSTRAP = REPO / "scripts" / "bootstrap.sh"
SYSTEM_PACKAGES = REPO / "scripts" / "system_packages.sh"
ROOT_ON_DEBIAN = os.geteuid() == 0 and Path("/etc/debian_version").exists()


@pytest.mark.skipif(not STAMP.exists(), reason="runs only in a checkout bootstrapped by scripts/bootstrap.sh")
def test_second_bootstrap_installs_nothing():
    before = STAMP.stat().st_mtime_ns
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""
    assert STAMP.stat().st_mtime_ns == before


def test_the_first_install_brings_numpy_at_the_project_pin_together_with_torch():
    # torch imported without numpy warns "Failed to initialize NumPy"; the bootstrap imports torch right after.
    script = BOOTSTRAP.read_text()
    extraction = re.search(r"^numpy_spec=.*?\}$", script, re.S | re.M).group()
    extracted = subprocess.run(["bash", "-c", f'set -euo pipefail\n{extraction}\necho "$numpy_spec"'], cwd=REPO,
                               capture_output=True, text=True, timeout=60, check=True).stdout.strip()  # fmt: skip
    pinned = [r for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
              if re.match(r"numpy\b", r)]  # fmt: skip
    assert [extracted] == pinned
    installs = [line for line in script.splitlines() if re.match(r"\s*(PIP_CONSTRAINT=\S+ )?quiet_pip install", line)]
    assert installs[0].strip() == 'quiet_pip install -q "$TORCH_SPEC" "$numpy_spec"'


def test_the_bootstrap_installs_the_system_packages_before_it_looks_at_the_venv():
    # An up-to-date .venv ends the bootstrap early: the packages must be seen to first.
    lines = [line.strip() for line in BOOTSTRAP.read_text().splitlines()]
    assert lines.index("bash scripts/system_packages.sh") < next(i for i, line in enumerate(lines) if "$stamp" in line)


@pytest.mark.skipif(not ROOT_ON_DEBIAN, reason="installs Debian packages only when run as root on Debian")
def test_as_root_on_debian_prometheus_and_chromium_are_installed_and_a_second_run_prints_nothing():
    first = subprocess.run(["bash", str(SYSTEM_PACKAGES)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    assert shutil.which("prometheus") and shutil.which("chromium")
    second = subprocess.run(["bash", str(SYSTEM_PACKAGES)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (second.returncode, second.stdout, second.stderr) == (0, "", "")


def test_the_package_install_is_quiet_and_brings_no_recommends():
    (install,) = [line for line in SYSTEM_PACKAGES.read_text().splitlines() if "apt-get install -" in line]
    assert "-qq" in install and "--no-install-recommends" in install and "-y" in install


@pytest.mark.slow
@pytest.mark.network  # pip installs a fresh .venv from PyPI
def test_bootstrapping_a_fresh_copy_prints_only_its_result_line(tmp_path):
    """The whole install into a new .venv (~5 min on 2 cores, ~2 GB): no warning reaches the user."""
    clone = tmp_path / "clone"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True, timeout=60)
    for name in filter(None, tracked.stdout.decode().split("\0")):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, clone / name)
    # As on a user's machine: pip's version check on (this project's machines turn it off).
    environment = {key: value for key, value in os.environ.items() if key != "PIP_DISABLE_PIP_VERSION_CHECK"}
    done = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=clone, capture_output=True, text=True, timeout=1800,
                          env=environment)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert re.fullmatch(r"bootstrap: \.venv ready \(torch [0-9.]+\)\n", done.stdout), done.stdout
