"""The soak benchmark's whole path at a tiny size: its own S3 server and Ray head, both real jobs, sampled."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "soak.py"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_soak_samples_every_ray_process_and_the_progress_of_both_jobs(tmp_path):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--images", "300", "--files-per-unit", "50", "--steps", "60",
         "--checkpoint-every", "30", "--sample-every", "1", "--plots", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1700, check=False)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "soak.json").read_text())
    for job in ("encode", "train"):
        assert report[job]["seconds"] > 0 and len(report[job]["rate_per_fifth"]) == 5
        assert report[job]["processes"], f"no Ray process lived through the {job} run"
        for row in report[job]["processes"].values():
            assert 10 < row["private_at_warmup_mib"] <= row["rss_at_warmup_mib"]
        assert (tmp_path / f"soak_{job}.png").stat().st_size > 10_000
        assert (tmp_path / f"{job}.log").stat().st_size > 0
    assert sum(report["encode"]["rate_per_fifth"]) > 0 and sum(report["train"]["rate_per_fifth"]) > 0
    assert "max private-memory growth after warm-up" in done.stdout
