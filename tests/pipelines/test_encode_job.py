"""The encode job end to end: `ray job submit` to a real Ray head, real S3, real taef2 + MiniLM weights."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from pipelines.demo.photos import write_photo_folder
from pipelines.encode_latents import SUMMARY_PREFIX
from pipelines.preprocess import PreprocessConfig, prepare_image
from services import storage
from services.cache.manifest import list_progress, read_manifest, shard_uris
from services.cache.reader import SkipCounter, read_samples
from services.encoders import build_codec, build_text_encoder
from tests.fixtures.corpora import (
    LAION_FETCH_SETTINGS,
    PHOTOS,
    LoopbackImageServer,
    finet2i_records,
    laion_rows,
    make_bad_input_corpus,
    make_finet2i_tar,
    make_laion_parquet,
    photo_jpeg,
)
from tests.fixtures.ray_cluster import new_submission_id

CONFIG = "configs/encode/folder-taef2-minilm.yaml"
RESOLUTION = 128
JOB_TIMEOUT_S = 240


def encode_args(source: dict, out_uri: str, *extra: str) -> list[str]:
    return ["python", "pipelines/encode_latents.py", "--config", CONFIG, "--set", f"source={json.dumps(source)}",
            "--set", f"output.uri={out_uri}", "--set", f"preprocess.resolution={RESOLUTION}",
            "--set", "preprocess.min_size=32", "--set", "progress_bar=false", *extra]  # fmt: skip


def summary_of(job: subprocess.CompletedProcess) -> dict:
    log = job.stdout + job.stderr
    lines = [line for line in log.splitlines() if line.startswith(SUMMARY_PREFIX)]
    assert lines, f"no summary in the job log (exit {job.returncode}):\n{log[-4000:]}"
    return json.loads(lines[-1][len(SUMMARY_PREFIX):])


# Deprecation notices that are neither the project's nor Ray's: torchao (which transformers imports when it is
# installed) registers enums that torch's pytree now supports natively.
FOREIGN_DEPRECATIONS = ("torch/utils/_pytree.py",)


def deprecation_notices(log: str) -> list[str]:
    """Lines of a job log that announce a deprecation (e.g. a Ray Data argument the job still passes)."""
    return [line for line in log.splitlines()
            if "deprecat" in line.lower() and not any(source in line for source in FOREIGN_DEPRECATIONS)]  # fmt: skip


def run_job(cluster, argv: list[str], *, submission_id: str | None = None) -> dict:
    job = cluster.submit(argv, timeout=JOB_TIMEOUT_S, submission_id=submission_id)
    summary = summary_of(job)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    assert deprecation_notices(job.stdout + job.stderr) == []
    return summary


def cached(out_uri: str) -> list:
    return list(read_samples(shard_uris(out_uri), SkipCounter(fail_fast=True)))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse)


def test_finet2i_tars_become_a_cache_with_every_key_once_faithful_latents_and_text_on_two_nodes(
    ray_cluster, s3_server, tmp_path
):
    records = finet2i_records()
    uris = []
    for part, chunk in enumerate((records[:4], records[4:])):
        local = make_finet2i_tar(tmp_path / f"train-{part:06d}.tar", chunk)
        uris.append(s3_server.uri("corpora/finet2i/synthetic", f"train-{part:06d}.tar"))
        storage.upload_file(local, uris[-1])
    out = s3_server.uri("caches/finet2i")
    submission_id = new_submission_id("encode-finet2i")
    summary = run_job(ray_cluster, encode_args({"kind": "finet2i", "uris": uris}, out), submission_id=submission_id)
    workers = ray_cluster.worker_node_ids()
    assert len(workers) == 2 and workers <= ray_cluster.job_node_ids(submission_id), "the job ran on one node"

    samples = cached(out)
    assert sorted(sample.key for sample in samples) == sorted(record["__key__"] for record in records)
    assert summary["samples_written"] == len(records) and summary["failures"] == {}
    assert 0 < summary["startup_seconds"] <= summary["seconds"] and summary["steady_images_per_second"] > 0
    codec = build_codec("taef2")
    text_encoder = build_text_encoder("minilm")
    config = PreprocessConfig(resolution=RESOLUTION, min_size=32)
    by_key = {record["__key__"]: (photo, record) for photo, record in zip(PHOTOS, records, strict=True)}
    for sample in samples:
        photo, record = by_key[sample.key]
        decoded = codec.decode(torch.from_numpy(sample.latent)[None])[0].permute(1, 2, 0).numpy() * 255
        assert psnr(decoded, prepare_image(photo_jpeg(photo.name), config).pixels) >= 25.0, sample.key
        direct = text_encoder.encode([record["json"]["enhanced_prompt"]])[0].numpy()
        cosine = np.sum(direct * sample.text, axis=1) / (np.linalg.norm(direct, axis=1) * np.linalg.norm(sample.text, axis=1))
        assert sample.text.shape == direct.shape and cosine.min() >= 0.999, sample.key
    assert storage.exists(storage.join(out, "null_text.npy"))


def test_laion_rows_against_a_misbehaving_http_server_are_counted_by_reason(ray_cluster, s3_server, tmp_path):
    with LoopbackImageServer() as server:
        rows, reasons = laion_rows(server)
        local = make_laion_parquet(tmp_path / "laion" / "part-00000.parquet", rows)
        uri = s3_server.uri("corpora/laion/part-00000.parquet")
        storage.upload_file(local, uri)
        out = s3_server.uri("caches/laion")
        # Each attempt on /slow still times out (SLOW_RESPONSE_S = 3 s); good images keep a margin for a busy CPU.
        source = {"kind": "laion", "uris": [uri], **LAION_FETCH_SETTINGS, "timeout_s": 2.0}
        summary = run_job(ray_cluster, encode_args(source, out))
    expected = dict(sorted(Counter(reason for reason in reasons if reason).items()))
    assert summary["failures"] == expected
    assert read_manifest(out).failures == expected
    assert summary["samples_written"] == reasons.count(None) == read_manifest(out).num_samples


def test_bad_inputs_are_counted_by_reason_and_never_crash_a_worker(ray_cluster, s3_server, tmp_path):
    expected = make_bad_input_corpus(tmp_path / "bad")
    out = s3_server.uri("caches/bad-inputs")
    # The codec runs as an autoscaling pool (1 to 2 actors) here: the same accounting must hold.
    summary = run_job(ray_cluster, encode_args({"kind": "folder", "root": str(tmp_path / "bad"),
                                                "files_per_unit": 5}, out, "--set", "codec.max_concurrency=2"))  # fmt: skip
    reasons = dict(sorted(Counter(reason for reason in expected.values() if reason).items()))
    assert summary["failures"] == reasons and summary["units_failed"] == {}
    assert sum(sum(progress.failures.values()) for progress in list_progress(out)) == sum(reasons.values())
    assert sorted(sample.key for sample in cached(out)) == sorted(k for k, reason in expected.items() if not reason)


# --------------------------------------------------------------------------- kill and resume


# Small writer calls make units finish one by one (a kill then lands between the first and the last),
# and 256 px images keep the CPU encoders busy for several seconds after the first unit is done.
STREAMING = ["--set", "output.fragment_samples=4", "--set", "output.max_samples_per_shard=4",
             "--set", "codec.batch_size=2", "--set", "preprocess.resolution=256"]  # fmt: skip


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory) -> Path:
    """42 photos in 21 units of 2."""
    root = tmp_path_factory.mktemp("many")
    for copy in range(6):
        write_photo_folder(root / f"copy{copy}")
    return root


def streaming_args(root: Path, out_uri: str) -> list[str]:
    return encode_args({"kind": "folder", "root": str(root), "files_per_unit": 2}, out_uri, *STREAMING)


def job_processes(marker: str, title: str = "") -> list[psutil.Process]:
    """Processes whose command line mentions `marker` (the job's unique output URI) or the Ray worker title."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if (marker and marker in cmdline and "encode_latents.py" in cmdline and "ray job" not in cmdline) or (
            title and title in cmdline
        ):
            found.append(process)
    return found


def wait_for_progress(out_uri: str, submitted: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list_progress(out_uri):
            return
        assert submitted.poll() is None, "the job ended before any unit finished"
        time.sleep(0.2)
    raise TimeoutError(f"no unit of {out_uri} finished in {timeout} s")


def cached_keys(out_uri: str) -> list[str]:
    return [sample.key for sample in cached(out_uri)]


@pytest.fixture(scope="module")
def uninterrupted_keys(ray_cluster, s3_server, many_photos) -> list[str]:
    out = s3_server.uri("caches/uninterrupted")
    run_job(ray_cluster, streaming_args(many_photos, out))
    return cached_keys(out)


def kill_during_run(cluster, argv: list[str], out_uri: str, victims) -> None:
    """Submit, SIGKILL `victims(out_uri)` once the first unit has finished, then let the submission end."""
    submitted = subprocess.Popen(cluster.submit_command(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=cluster.env, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    try:
        wait_for_progress(out_uri, submitted)
        assert not storage.exists(storage.join(out_uri, "manifest.json")), "the job finished before the kill"
        processes = victims(out_uri)
        assert processes, "found no process to kill"
        for process in processes:
            os.kill(process.pid, signal.SIGKILL)
        submitted.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if submitted.poll() is None:
            submitted.kill()


@pytest.mark.slow
def test_resubmitting_after_the_driver_is_killed_gives_the_uninterrupted_key_set(
    ray_cluster, s3_server, many_photos, uninterrupted_keys
):
    out = s3_server.uri("caches/driver-killed")
    argv = streaming_args(many_photos, out)
    kill_during_run(ray_cluster, argv, out, lambda marker: job_processes(marker))
    finished_before = len(list_progress(out))
    # The killed driver's writer lease has not expired: a resubmission is refused, naming that job...
    refused = ray_cluster.submit(argv, timeout=JOB_TIMEOUT_S)
    assert refused.returncode != 0
    assert re.search(r"is being written by Ray job raysubmit_\w+ \(pid \d+ on ", refused.stdout + refused.stderr)
    # ...until the operator, who knows it is dead, breaks the lease.
    summary = run_job(ray_cluster, [*argv, "--break-lease"])
    keys = cached_keys(out)
    assert summary["units_already_done"] >= finished_before >= 1 and finished_before < summary["units_selected"]
    assert sorted(keys) == sorted(uninterrupted_keys) and len(set(keys)) == len(keys)


@pytest.mark.slow
def test_resubmitting_after_an_encoder_actor_is_killed_gives_the_uninterrupted_key_set(
    ray_cluster, s3_server, many_photos, uninterrupted_keys
):
    out = s3_server.uri("caches/actor-killed")
    argv = streaming_args(many_photos, out)
    kill_during_run(ray_cluster, argv, out, lambda _: job_processes("", "ImageEncoderActor"))
    run_job(ray_cluster, argv)
    keys = cached_keys(out)
    assert sorted(keys) == sorted(uninterrupted_keys) and len(set(keys)) == len(keys)


@pytest.mark.slow
def test_a_30_s_s3_outage_during_an_encode_job_is_waited_out_and_gives_the_uninterrupted_cache(
    ray_cluster, s3_server, many_photos, uninterrupted_keys
):
    out = s3_server.uri("caches/outage")
    started = time.monotonic()
    submitted = subprocess.Popen(ray_cluster.submit_command(streaming_args(many_photos, out)), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, env=ray_cluster.env,
                                 cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    try:
        wait_for_progress(out, submitted)
        units_before = len(list_progress(out))
        assert not storage.exists(storage.join(out, "manifest.json")), "the job finished before the outage"
        with s3_server.stopped(restart_after=30) as outage:
            pass  # the block ends when the server is back, 30 s after it stopped
        output, _ = submitted.communicate(timeout=JOB_TIMEOUT_S + 60)
    finally:
        if submitted.poll() is None:
            submitted.kill()
    seconds = time.monotonic() - started
    assert submitted.returncode == 0, output[-4000:]  # no resubmission: the same job rode the outage out
    assert "retrying write" in output, "the outage missed the job's writes"
    summary = summary_of(subprocess.CompletedProcess([], 0, output, ""))
    keys = cached_keys(out)
    assert sorted(keys) == sorted(uninterrupted_keys) and len(set(keys)) == len(keys)
    assert summary["units_failed"] == {} and summary["failures"] == {} and summary["units_already_done"] == 0
    progress = list_progress(out)
    assert len(progress) == summary["units_selected"] and sum(p.samples_written for p in progress) == len(keys)
    card = read_manifest(out)
    assert card.num_samples == len(keys) and sum(shard.num_samples for shard in card.shards) == len(keys)
    print(f"outage {outage.seconds:.1f} s after {units_before} units: job {seconds:.0f} s")
