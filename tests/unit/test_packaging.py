"""A non-editable install works away from the checkout: the wheel carries the pretrained weights it loads."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("services", "pipelines", "trainer", "infra")
WEIGHTS = "services/encoders/weights/tiny_autoencoders/"


def test_the_wheel_carries_the_tiny_autoencoders_and_loads_them_outside_the_checkout(tmp_path):
    # Built from a copy, so the build's egg-info and build/ folders never land in the checkout.
    source = tmp_path / "source"
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(tmp_path / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("hybriddit_factory-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        shipped = sorted(name.removeprefix(WEIGHTS) for name in archive.namelist() if name.startswith(WEIGHTS))
    assert shipped == ["LICENSE.taesd", "README.md", "taef2_decoder.safetensors", "taef2_encoder.safetensors",
                       "taesana_encoder.safetensors"]  # fmt: skip

    # The unpacked wheel comes first on the path, the working directory is elsewhere, no override is set.
    environment = {key: value for key, value in os.environ.items() if key != "HYBRIDDIT_TINY_AE_DIR"}
    environment["PYTHONPATH"] = str(tmp_path / "site")
    loaded = subprocess.run(
        [sys.executable, "-c", "import services.encoders.tiny_autoencoders as t, services.encoders as e; "
         "e.build_codec('taef2'); e.build_codec('taesana-encoder'); print(t.tiny_autoencoder_dir())"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=environment,
    )  # fmt: skip
    assert loaded.returncode == 0, loaded.stderr
    assert Path(loaded.stdout.strip()) == tmp_path / "site" / WEIGHTS.rstrip("/")
