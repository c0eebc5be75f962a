"""The train job under `ray job submit`: 2-worker CPU DDP on an S3 cache, kill + resubmit resumes exactly."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time

import psutil
import pytest

from pipelines.demo.synthetic_cache import write_tiny_cache
from tests.fixtures.ray_cluster import REPO, new_submission_id
from trainer.checkpoint import complete_steps

SUMMARY = re.compile(r"TRAIN_SUMMARY (\{.*\})")
STEPS = 40


@pytest.fixture(scope="module")
def s3_cache(s3_server):
    uri = s3_server.uri("trainer-tests", "cache")
    write_tiny_cache(uri, shard_sizes=[24, 24, 24, 24, 16, 16])
    return uri


def train_argv(cache_uri: str, checkpoint_uri: str) -> list[str]:
    overrides = {
        "data.uris": f"[{cache_uri}]", "checkpoint.uri": checkpoint_uri, "checkpoint.every_steps": 10,
        "max_steps": STEPS, "batch_size": 16, "report_every": 10, "optimizer.lr": 3e-3, "cfg_dropout": 0.0,
        "scaling.num_workers": 2, "run_name": checkpoint_uri.rsplit("/", 2)[-2],
    }
    argv = ["python", "trainer/train.py", "--config", "configs/train/tiny-cpu.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def project_warnings(log: str) -> list[str]:
    """Python warnings in a job log raised from this repository's own files (`<repo>/x.py:N: UserWarning: ...`)."""
    return re.findall(rf"{re.escape(str(REPO))}/\S+\.py:\d+: \w*Warning: .*", log)


def summary_of(output: str) -> dict:
    found = SUMMARY.findall(output)
    assert found, output[-3000:]
    return json.loads(found[-1])


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, s3_server, s3_cache):
    started = time.monotonic()
    submission_id = new_submission_id("train-straight")
    result = ray_cluster.submit(train_argv(s3_cache, s3_server.uri("trainer-tests", "straight", "checkpoints")),
                                timeout=600, submission_id=submission_id)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert project_warnings(result.stdout + result.stderr) == []
    return {**summary_of(result.stdout), "seconds": time.monotonic() - started,
            "node_ids": ray_cluster.job_node_ids(submission_id)}  # fmt: skip


def test_two_ddp_workers_on_two_nodes_stay_identical_and_the_loss_falls(ray_cluster, uninterrupted):
    workers = ray_cluster.worker_node_ids()
    assert len(workers) == 2 and workers <= uninterrupted["node_ids"], "the DDP ranks did not run on both nodes"
    first, second = uninterrupted["replica_fingerprints"]
    assert first == second
    losses = uninterrupted["reported_losses"]
    assert uninterrupted["step"] == STEPS and len(losses) == STEPS // 10
    assert losses[-1] < losses[0]


def driver_processes(marker: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline and "trainer/train.py" in cmdline and "ray job" not in cmdline:
            found.append(process)
    return found


def kill_driver_after_checkpoint(cluster, argv: list[str], checkpoints: str, after_step: int = 0) -> int:
    """Submit, SIGKILL the job's driver once a checkpoint of its own (step > `after_step`) is complete; that step."""
    job = subprocess.Popen(cluster.submit_command(argv), cwd=REPO, env=cluster.env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not [step for step in complete_steps(checkpoints) if step > after_step]:
            assert time.monotonic() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(0.5)
        drivers = driver_processes(checkpoints)
        assert drivers
        for process in drivers:
            process.send_signal(signal.SIGKILL)
        job.wait(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    time.sleep(10)  # Ray reaps the dead job's training workers and frees their CPUs
    return complete_steps(checkpoints)[-1]


@pytest.mark.slow
def test_a_killed_job_resubmitted_resumes_and_ends_like_an_uninterrupted_run(
        ray_cluster, s3_server, s3_cache, uninterrupted):
    checkpoints = s3_server.uri("trainer-tests", "killed", "checkpoints")
    argv = train_argv(s3_cache, checkpoints)
    saved_step = kill_driver_after_checkpoint(ray_cluster, argv, checkpoints)
    assert 0 < saved_step < STEPS
    result = ray_cluster.submit(argv, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    assert re.search(r"resumed from \S+ at step (\d+)", result.stdout + result.stderr)
    resumed = summary_of(result.stdout)
    assert resumed["step"] == STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(uninterrupted["replica_fingerprints"], rel=1e-6)


def train_worker_processes() -> list[psutil.Process]:
    return [process for process in psutil.process_iter(["cmdline"])
            if (process.info["cmdline"] or [""])[0].startswith("ray::RayTrainWorker")]


@pytest.mark.slow
def test_a_training_worker_killed_mid_run_is_replaced_and_the_run_ends_like_an_uninterrupted_one(
        ray_cluster, s3_server, s3_cache, uninterrupted):
    # As when a node dies: Ray Train restarts the worker group (max_failures) and every rank resumes
    # from the latest complete checkpoint, within the same job.
    checkpoints = s3_server.uri("trainer-tests", "worker-killed", "checkpoints")
    argv = train_argv(s3_cache, checkpoints) + ["--set", "scaling.max_failures=1"]
    job = subprocess.Popen(ray_cluster.submit_command(argv), cwd=REPO, env=ray_cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not complete_steps(checkpoints):
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.5)
        workers = train_worker_processes()
        assert len(workers) == 2, [worker.info["cmdline"] for worker in workers]
        workers[-1].send_signal(signal.SIGKILL)
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert re.search(r"resumed from \S+ at step (\d+)", output), output[-3000:]
    resumed = summary_of(output)
    assert resumed["step"] == STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(uninterrupted["replica_fingerprints"], rel=1e-6)


@pytest.mark.slow
def test_the_train_job_trains_on_a_cache_written_by_the_encode_job(ray_cluster, s3_server, tmp_path):
    from pipelines.demo.photos import write_photo_folder
    from services.cache.manifest import read_manifest

    write_photo_folder(tmp_path / "photos")
    cache = s3_server.uri("trainer-tests", "encoded")
    encode = ray_cluster.submit(
        ["python", "pipelines/encode_latents.py", "--config", "configs/encode/folder-taef2-minilm.yaml",
         "--set", f"source.root={tmp_path / 'photos'}", "--set", f"output.uri={cache}",
         "--set", "preprocess.resolution=64", "--set", "preprocess.min_size=32", "--set", "progress_bar=false"],
        timeout=300)
    assert encode.returncode == 0, (encode.stdout + encode.stderr)[-3000:]
    card = read_manifest(cache)
    argv = train_argv(cache, s3_server.uri("trainer-tests", "encoded-run", "checkpoints"))
    argv += ["--set", f"model.overrides={{latent_channels: {card.latent_channels}, text_dim: {card.text_dim}}}",
             "--set", "batch_size=2", "--set", "max_steps=4", "--set", "report_every=2", "--set", "cfg_dropout=0.5"]
    result = ray_cluster.submit(argv, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    summary = summary_of(result.stdout)
    assert summary["step"] == 4 and len(set(summary["replica_fingerprints"])) == 1


@pytest.mark.slow
def test_a_30_s_s3_outage_during_training_is_waited_out_and_the_run_ends_like_an_uninterrupted_one(
        ray_cluster, s3_server, s3_cache, uninterrupted):
    # Every epoch re-reads the shards, so the outage lands on shard reads (and on any checkpoint due).
    checkpoints = s3_server.uri("trainer-tests", "outage", "checkpoints")
    started = time.monotonic()
    job = subprocess.Popen(ray_cluster.submit_command(train_argv(s3_cache, checkpoints)), cwd=REPO,
                           env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not complete_steps(checkpoints):
            assert time.monotonic() < deadline and job.poll() is None, "no checkpoint appeared"
            time.sleep(0.5)
        step_at_outage = complete_steps(checkpoints)[-1]
        with s3_server.stopped(restart_after=30) as outage:
            pass  # the block ends when the server is back, 30 s after it stopped
        output, _ = job.communicate(timeout=600)
    finally:
        if job.poll() is None:
            job.kill()
    seconds = time.monotonic() - started
    assert job.returncode == 0, output[-3000:]
    assert step_at_outage < STEPS and outage.seconds >= 30
    assert "retrying read" in output, "the outage missed the shard reads"
    assert "resumed from" not in output  # waited out in place: no worker group restart, no redone step
    summary = summary_of(output)
    assert summary["step"] == STEPS and summary["samples_skipped"] == {}
    assert summary["replica_fingerprints"] == pytest.approx(uninterrupted["replica_fingerprints"], rel=1e-6)
    print(f"outage {outage.seconds:.1f} s from step {step_at_outage}: job {seconds:.0f} s vs "
          f"{uninterrupted['seconds']:.0f} s uninterrupted")
