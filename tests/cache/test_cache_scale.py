"""The corpus-sized cache benchmark's whole path at a tiny size, against the session's real S3 server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "cache_scale.py"


@pytest.mark.timeout(1800)  # four measuring processes, each importing torch: minutes on the loaded shared cores
def test_cache_scale_benchmark_measures_every_operation_at_each_size_on_a_half_and_a_whole_cache(
        s3_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDDIT_BUCKET", s3_server.bucket)  # the benchmark uses the configured endpoint's bucket
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--shards", "4", "8", "--samples-per-shard", "4", "--world-size", "2",
         "--batch-per-rank", "2", "--window-shards", "2", "--processes", "1", "--threads", "2", "--out", str(out)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800, check=False)  # the shared 2 cores are slow
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert set(report) == {"encode_plan", "status", "publish", "epoch_plan", "resume_90", "eval_reads"}
    assert all([row["shards"] for row in rows] == [4, 8] for rows in report.values())
    assert all(row["seconds"] > 0 and row["peak_mib"] >= 0 for rows in report.values() for row in rows)
    details = {operation: [row["detail"] for row in rows] for operation, rows in report.items()}
    # Half-way the plan holds every unit (2 shards each) and half of them are finished.
    assert details["encode_plan"] == [{"to_run": 1, "done": 1}, {"to_run": 2, "done": 2}]
    assert details["status"] == [{"units_done": 1, "shards": 2}, {"units_done": 2, "shards": 4}]
    assert details["publish"] == [{"shards": 4, "samples": 16}, {"shards": 8, "samples": 32}]
    steps = [detail["steps"] for detail in details["epoch_plan"]]
    assert steps[0] > 0 and steps[1] > steps[0]
    for resume, planned in zip(details["resume_90"], steps, strict=True):
        assert resume == {"start_batch": int(0.9 * planned), "position": int(0.9 * planned) + 1}
    assert all(detail == {"images": 8, "image_shape": [3, 2, 2]} for detail in details["eval_reads"])
    assert "growth exponent" in done.stdout and "eval_reads" in done.stdout
