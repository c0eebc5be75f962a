"""Node loss and whole-stack loss against real Ray nodes and a real SIGKILL (all slow: minutes each on 2 cores).

Each test prints a `FAULT_FIGURES {...}` line (time to recover, work redone) for the README's fault table:
run with `-s` to see them.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time

import pytest

from infra.local.processes import kill_session, session_pids
from pipelines.demo.synthetic_cache import write_tiny_cache
from services import storage
from services.cache.manifest import list_progress
from tests.fixtures.ray_cluster import (
    REPO,
    VENV_BIN,
    kill_node,
    new_submission_id,
    running_cluster,
)
from tests.integration.test_stack import (
    free_stack_overrides,
    hybriddit_stack,
    pid_of,
    stack_client_env,
    stack_pid_files,
)
from tests.pipelines.test_encode_job import cached_keys, streaming_args, wait_for_progress
from tests.pipelines.test_encode_job import summary_of as encode_summary_of
from tests.trainer.test_train_job import STEPS, summary_of, train_argv
from trainer.checkpoint import complete_steps

# Generous: on the shared 2-core machine these ran beside other engineers' jobs (load average ~25), where
# one test (a cluster start, two or three jobs) took longer than the suite's 900 s default.
JOB_TIMEOUT_S = 900
pytestmark = [pytest.mark.slow, pytest.mark.timeout(4 * JOB_TIMEOUT_S)]

TINY_CACHE_SHARDS = [24, 24, 24, 24, 16, 16]
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
STEP_LOGGED = re.compile(r"step (\d+): loss=")


def run_encode(cluster, argv: list[str], *, submission_id: str | None = None) -> dict:
    job = cluster.submit(argv, timeout=JOB_TIMEOUT_S, submission_id=submission_id)
    summary = encode_summary_of(job)
    assert job.returncode == 0, (job.stdout + job.stderr)[-4000:]
    return summary


def report(fault: str, **figures) -> None:
    print("FAULT_FIGURES " + json.dumps({"fault": fault, **figures}), flush=True)


@pytest.fixture(scope="module")
def cluster(s3_server, tmp_path_factory):
    """A cluster of its own: these tests kill its nodes, which must not disturb the session's cluster."""
    with running_cluster(tmp_path_factory.mktemp("fault-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from pipelines.demo.photos import write_photo_folder

    root = tmp_path_factory.mktemp("fault-photos")
    for copy in range(6):
        write_photo_folder(root / f"copy{copy}")
    return root


@pytest.fixture(scope="module")
def tiny_cache(s3_server) -> str:
    uri = s3_server.uri("node-faults", "cache")
    write_tiny_cache(uri, shard_sizes=TINY_CACHE_SHARDS)
    return uri


@pytest.fixture(scope="module")
def uninterrupted_train(cluster, s3_server, tiny_cache) -> dict:
    started = time.monotonic()
    result = cluster.submit(train_argv(tiny_cache, s3_server.uri("node-faults", "straight", "checkpoints")),
                            timeout=JOB_TIMEOUT_S)  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return {**summary_of(result.stdout), "seconds": time.monotonic() - started}


def wait_for_first_checkpoint(checkpoints: str, job: subprocess.Popen) -> None:
    """Until the running train job has published a complete checkpoint (its `_COMPLETE.json`)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not complete_steps(checkpoints):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        assert job.poll() is None, "the job ended before its first checkpoint"
        time.sleep(0.5)


def test_an_encode_job_that_loses_a_worker_node_ends_with_the_uninterrupted_key_set(cluster, s3_server, photos):
    out = s3_server.uri("node-faults", "encode-node-killed")
    argv = streaming_args(photos, out)
    submitted = subprocess.Popen(cluster.submit_command(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, env=cluster.env, cwd=REPO)  # fmt: skip
    victim = cluster.workers[-1]
    try:
        started = time.monotonic()
        wait_for_progress(out, submitted, timeout=JOB_TIMEOUT_S)
        assert not storage.exists(storage.join(out, "manifest.json")), "the job finished before the kill"
        units_done_at_kill = len(list_progress(out))
        killed_id = victim.node_id()
        killed_at = time.monotonic()
        kill_node(victim)
        output, _ = submitted.communicate(timeout=JOB_TIMEOUT_S)
        ended_at = time.monotonic()
    finally:
        if submitted.poll() is None:
            submitted.kill()
    same_job = submitted.returncode == 0
    resubmitted_seconds = None
    if not same_job:
        # Ray could not retry what the node held: one resubmission redoes only the unfinished units.
        resubmit_started = time.monotonic()
        summary = run_encode(cluster, argv)
        resubmitted_seconds = time.monotonic() - resubmit_started
        assert summary["units_already_done"] >= units_done_at_kill
    keys = cached_keys(out)

    # The node comes back (a new raylet, so a new node id) and takes new work: the reference run.
    victim.start(cluster.node_env)
    rejoined = victim.node_id()
    assert rejoined not in (None, killed_id)
    reference_out = s3_server.uri("node-faults", "encode-uninterrupted")
    reference_id = new_submission_id("encode-reference")
    reference_started = time.monotonic()
    reference = run_encode(cluster, streaming_args(photos, reference_out), submission_id=reference_id)
    reference_seconds = time.monotonic() - reference_started
    assert rejoined in cluster.job_node_ids(reference_id), "no work was scheduled on the restarted node"

    uninterrupted_keys = cached_keys(reference_out)
    assert sorted(keys) == sorted(uninterrupted_keys) and len(set(keys)) == len(keys)
    report("encode: worker node SIGKILLed mid-job", same_job=same_job, job_output_tail=output[-300:] if not same_job
           else None, units_total=reference["units_selected"], units_done_at_kill=units_done_at_kill,
           kill_to_job_end_s=round(ended_at - killed_at, 1), faulty_job_s=round(ended_at - started, 1),
           resubmission_s=resubmitted_seconds and round(resubmitted_seconds, 1),
           uninterrupted_s=round(reference_seconds, 1))  # fmt: skip


def test_a_train_job_that_loses_a_worker_node_restarts_its_group_when_the_node_rejoins_and_resumes_exactly(
    cluster, s3_server, tiny_cache, uninterrupted_train
):
    checkpoints = s3_server.uri("node-faults", "train-node-killed", "checkpoints")
    argv = train_argv(tiny_cache, checkpoints) + ["--set", "scaling.max_failures=1"]
    submission_id = new_submission_id("train-node-killed")
    job = subprocess.Popen(cluster.submit_command(argv, submission_id=submission_id), cwd=REPO, env=cluster.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    victim = cluster.workers[-1]
    try:
        wait_for_first_checkpoint(checkpoints, job)
        killed_id = victim.node_id()
        killed_at = time.monotonic()
        kill_node(victim)
        saved_step = complete_steps(checkpoints)[-1]
        # One rank per 1-CPU node: the new worker group waits until the node rejoins.
        victim.start(cluster.node_env)
        rejoined_at = time.monotonic()
        rejoined = victim.node_id()
        output, _ = job.communicate(timeout=JOB_TIMEOUT_S)
        ended_at = time.monotonic()
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, output[-3000:]
    assert rejoined not in (None, killed_id)
    resumed_at = [int(step) for step in RESUMED.findall(output)]
    assert resumed_at and resumed_at[-1] >= saved_step > 0, output[-3000:]
    assert rejoined in cluster.job_node_ids(submission_id), "no rank was scheduled on the restarted node"
    resumed = summary_of(output)
    assert resumed["step"] == STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(uninterrupted_train["replica_fingerprints"], rel=1e-6)
    logged_before_restart = [int(step) for step in STEP_LOGGED.findall(output.split("resumed from")[0])]
    report("train: worker node SIGKILLed mid-run (max_failures=1)", resumed_from_step=resumed_at[-1],
           steps_logged_before_kill=max(logged_before_restart, default=0),
           node_restart_s=round(rejoined_at - killed_at, 1), kill_to_job_end_s=round(ended_at - killed_at, 1),
           uninterrupted_s=round(uninterrupted_train["seconds"], 1))  # fmt: skip


def test_killing_the_whole_stack_mid_training_then_stack_up_and_resubmit_resumes_exactly(
    uninterrupted_train, tmp_path, monkeypatch
):
    up = [*free_stack_overrides(tmp_path / "stack"), "--workers", "2"]
    try:
        status = hybriddit_stack("up", up)
        env = {**os.environ, **stack_client_env(up)}
        for name in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"):
            monkeypatch.setenv(name, env[name])  # this process reads and writes the stack's S3 from here on
        bucket = f"s3://{env['HYBRIDDIT_BUCKET']}"
        cache, checkpoints = storage.join(bucket, "restart", "cache"), storage.join(bucket, "restart", "checkpoints")
        write_tiny_cache(cache, shard_sizes=TINY_CACHE_SHARDS)
        submit = [str(VENV_BIN / "ray"), "job", "submit", "--address", status["ray"]["dashboard"], "--",
                  *train_argv(cache, checkpoints)]  # fmt: skip
        job = subprocess.Popen(submit, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_for_first_checkpoint(checkpoints, job)
            killed_at = time.monotonic()
            leaders = [pid_of(status, name) for name in stack_pid_files(status)]
            for leader in leaders:
                kill_session(leader)
            assert not [pid for leader in leaders for pid in session_pids(leader)], "a process outlived SIGKILL"
            before, _ = job.communicate(timeout=120)  # the client loses the head and exits
        finally:
            if job.poll() is None:
                job.kill()

        again = hybriddit_stack("up", up)
        up_at = time.monotonic()
        assert again["s3"]["running"] and all(node["node_id"] for node in again["ray"]["workers"])
        saved_step = complete_steps(checkpoints)[-1]
        assert 0 < saved_step < STEPS
        result = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
        ended_at = time.monotonic()
    finally:
        hybriddit_stack("down", up)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # Every rank logs its resume (and Ray may repeat a line): each must name the step last saved before the kill.
    resumed_at = {int(step) for step in RESUMED.findall(output)}
    assert resumed_at == {saved_step}, output[-3000:]
    resumed = summary_of(result.stdout)
    assert resumed["step"] == STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(uninterrupted_train["replica_fingerprints"], rel=1e-6)
    logged_before_kill = [int(step) for step in STEP_LOGGED.findall(before)]
    report("whole stack (S3, Ray head, 2 worker nodes) SIGKILLed mid-run", resumed_from_step=saved_step,
           steps_logged_before_kill=max(logged_before_kill, default=0), stack_up_s=round(up_at - killed_at, 1),
           kill_to_job_end_s=round(ended_at - killed_at, 1), resubmitted_job_s=round(ended_at - up_at, 1),
           uninterrupted_s=round(uninterrupted_train["seconds"], 1))  # fmt: skip
