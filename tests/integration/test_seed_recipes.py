"""The comparisons of the seed recipes that build on a trained model, run as their benchmarks on the shipped digits.

LiT's conversion (benchmarks/lit_conversion.py) pays, by a margin noise cannot make. Hi-DiT's stage 2
(benchmarks/hidit_stages.py) does not pay on these digits yet (README, "Does stage 2 pay?"), so its test checks
only that the comparison measures what it says, at a tiny size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def run_benchmark(script: str, out: Path, *options: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *options, "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=2300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(done.stdout)
    return json.loads(out.read_text())


def test_a_converted_lit_student_reaches_its_teacher_in_fewer_steps_than_one_trained_from_scratch(tmp_path):
    report = run_benchmark("lit_conversion.py", tmp_path / "lit.json", "--student-steps", "600")
    scratch, converted = report["students"]["LiT-T2I-tiny from scratch"], report["students"]["LiT-T2I-tiny converted"]
    assert converted["steps_to_target"] is not None, converted
    # from scratch it takes at least twice as long, if it gets there at all
    assert scratch["steps_to_target"] is None or scratch["steps_to_target"] >= 2 * converted["steps_to_target"]
    # and the converted student is ahead at every validation, not only at the crossing
    assert all(converted["val_loss"][step] < loss for step, loss in scratch["val_loss"].items())


def test_the_hidit_comparison_scores_every_run_at_every_noise_level_against_the_codec_floor(tmp_path):
    report = run_benchmark("hidit_stages.py", tmp_path / "hidit.json", "--stage1-steps", "4", "--extra-steps", "4",
                           "--batch-size", "8")
    errors = report["pixel_mse"]
    assert set(errors) == {"stage 1", "stage 1 continued", "stage 2"}
    for name, by_t in errors.items():
        assert set(by_t) == {*map(str, report["t_grid"]), "codec"}, name
        assert all(by_t[str(t)] > 0 for t in report["t_grid"]), name
    # decoding the clean latent is the floor of every estimate that goes through the latent
    assert 0 < report["codec_mse"] <= errors["stage 1"]["0.2"]
