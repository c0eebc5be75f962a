"""The GPU train-step benchmark's CPU paths: the no-CUDA exit, and the whole measuring path on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_train_step.py"
sys.path.insert(0, str(SCRIPT.parent))

from gpu_train_step import peak_tflops_for  # noqa: E402


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=REPO_ROOT,
                          timeout=1800, check=False)  # generous: the shared 2 cores saw load averages of 60+


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the benchmark measures instead")
def test_without_cuda_the_benchmark_exits_0_saying_there_is_nothing_to_measure():
    done = run_benchmark()
    assert done.returncode == 0, done.stderr
    assert "no CUDA device: nothing to measure" in done.stdout


def test_cpu_smoke_runs_every_measuring_step_and_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    done = run_benchmark("--cpu-smoke", "--peak-tflops", "0.5", "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    modes = {row["mode"]: row for row in report["modes"]}
    assert list(modes) == ["fp32", "bf16", "bf16+compile", "fp8+compile"]
    fp32 = modes["fp32"]
    assert fp32["status"] == "measured" and fp32["steps"] == 2
    assert fp32["samples_per_second"] == pytest.approx(4 * fp32["steps_per_second"])
    assert fp32["tflops_per_second"] > 0
    assert fp32["mfu"] == pytest.approx(fp32["tflops_per_second"] / 0.5)
    assert modes["bf16"]["status"] == "skipped: bf16 autocast runs on CUDA only"
    assert modes["fp8+compile"]["status"] == "skipped: needs SM 8.9"
    assert report["image_tokens"] == 64 and max(report["text_tokens"]) <= 16  # tiny preset, text truncated
    assert report["input_pipeline"]["batches"] == 2 and report["input_pipeline"]["samples_per_second"] > 0
    assert "fp32 " in done.stdout and "input pipeline alone" in done.stdout


def test_mfu_peak_comes_from_the_gpu_name_and_is_omitted_for_unknown_gpus():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops_for("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert peak_tflops_for("NVIDIA GeForce GTX 1080") is None
