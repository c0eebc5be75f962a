"""LiT's recipe under `ray job submit` (configs/train/lit-tiny-cpu.yaml) on a cache the encode job wrote: weight
inheritance from a softmax teacher's export, hybrid distillation from it, and the checkpoint/resume guarantees of
every train job."""

from __future__ import annotations

import re

import pytest

from services import storage
from tests.fixtures.ray_cluster import new_submission_id
from tests.model.model_helpers import randomize_weights
from tests.trainer.test_train_job import kill_driver_after_checkpoint, project_warnings, summary_of
from trainer.checkpoint import EXPORT_DIR, complete_steps, step_dir_name
from trainer.export import LatentNormalisation, read_exported_config, save_exported_model
from trainer.models import build_model, resolve_config

# Each runs the encode job and the recipe's train jobs on a Ray cluster: minutes apiece on 2 cores, so `make
# test-slow`; the default suite covers the same recipes in process (test_loop.py, test_hidit_training.py).
pytestmark = pytest.mark.slow

STEPS = 12


@pytest.fixture(scope="module")
def encoded_cache(ray_cluster, s3_server, tmp_path_factory):
    """Real photos through the encode job (taef2 latents, MiniLM text) into S3."""
    from pipelines.demo.photos import write_photo_folder

    photos = tmp_path_factory.mktemp("photos")
    write_photo_folder(photos)
    cache = s3_server.uri("lit-tests", "encoded")
    encode = ray_cluster.submit(
        ["python", "pipelines/encode_latents.py", "--config", "configs/encode/folder-taef2-minilm.yaml",
         "--set", f"source.root={photos}", "--set", f"output.uri={cache}", "--set", "preprocess.resolution=64",
         "--set", "preprocess.min_size=32", "--set", "progress_bar=false"],
        timeout=600)
    assert encode.returncode == 0, (encode.stdout + encode.stderr)[-3000:]
    return cache


@pytest.fixture(scope="module")
def teacher_export(s3_server, encoded_cache, tmp_path_factory):
    """A softmax text-to-image teacher (CrossDiT-tiny, non-zero weights) exported as a run on that cache exports
    it: its model config, the cache's codec, text encoder and latent normalisation, published to S3."""
    from services.cache.manifest import read_manifest

    card = read_manifest(encoded_cache)
    config = resolve_config("CrossDiT-tiny").model_copy(
        update={"latent_channels": card.latent_channels, "text_dim": card.text_dim})
    local = save_exported_model(
        tmp_path_factory.mktemp("teacher"), randomize_weights(build_model(config), seed=3, std=0.1),
        codec=card.codec, text_encoder=card.text_encoder,
        latent_normalisation=LatentNormalisation(scale=card.latent_scale, shift=card.latent_shift))
    uri = s3_server.uri("lit-tests", "teacher", "export")
    storage.publish_dir(local, uri)
    return uri, card


def lit_argv(cache_uri: str, teacher_uri: str, card, checkpoint_uri: str) -> list[str]:
    overrides = {
        "data.uris": f"[{cache_uri}]", "teacher": teacher_uri, "init_from": teacher_uri,
        "model.overrides": f"{{latent_channels: {card.latent_channels}, text_dim: {card.text_dim}}}",
        "checkpoint.uri": checkpoint_uri, "checkpoint.every_steps": 4, "max_steps": STEPS, "batch_size": 2,
        "report_every": 4, "run_name": checkpoint_uri.rsplit("/", 2)[-2],
    }
    argv = ["python", "trainer/train.py", "--config", "configs/train/lit-tiny-cpu.yaml"]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


@pytest.fixture(scope="module")
def uninterrupted_lit(ray_cluster, s3_server, encoded_cache, teacher_export):
    teacher_uri, card = teacher_export
    checkpoints = s3_server.uri("lit-tests", "straight", "checkpoints")
    submission_id = new_submission_id("lit-straight")
    result = ray_cluster.submit(lit_argv(encoded_cache, teacher_uri, card, checkpoints), timeout=600,
                                submission_id=submission_id)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    return {"summary": summary_of(result.stdout), "log": log, "checkpoints": checkpoints}


def test_the_lit_recipe_inherits_from_and_distils_a_teacher_on_an_encode_job_cache(uninterrupted_lit,
                                                                                     teacher_export):
    teacher_uri, _ = teacher_export
    summary, log = uninterrupted_lit["summary"], uninterrupted_lit["log"]
    assert summary["step"] == STEPS and len(set(summary["replica_fingerprints"])) == 1
    assert all(loss == loss for loss in summary["reported_losses"])  # no NaN
    assert project_warnings(log) == []
    assert f"distilling from teacher {teacher_uri}" in log
    # the inheritance report: every tensor but the 4 blocks' linear attention (qkv, proj, conv on V) came over
    inherited = re.search(r"inherited (\d+) tensors; kept fresh: (\d+) linear attention, 0 absent from teacher, "
                          r"0 shape-mismatched", log)
    assert inherited and int(inherited.group(2)) == 4 * 6, log[-3000:]
    export = read_exported_config(storage.join(uninterrupted_lit["checkpoints"], step_dir_name(STEPS), EXPORT_DIR))
    assert export.model.full_attention_blocks == [] and export.model.cross_attention_in == "all"


def test_a_teacher_of_other_encoders_stops_the_lit_job_before_training(ray_cluster, s3_server, encoded_cache,
                                                                       teacher_export, tmp_path):
    _, card = teacher_export
    local = save_exported_model(tmp_path / "teacher", build_model("CrossDiT-tiny"), codec={"name": "pixel"},
                                text_encoder=card.text_encoder)
    wrong = s3_server.uri("lit-tests", "wrong-teacher", "export")
    storage.publish_dir(local, wrong)
    result = ray_cluster.submit(lit_argv(encoded_cache, wrong, card, s3_server.uri("lit-tests", "wrong", "ckpt")),
                                timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "was trained with codec {'name': 'pixel'}, but this run's cache has" in log, log[-3000:]
    assert not complete_steps(s3_server.uri("lit-tests", "wrong", "ckpt"))


def test_a_killed_lit_job_resubmitted_resumes_and_ends_like_an_uninterrupted_run(
        ray_cluster, s3_server, encoded_cache, teacher_export, uninterrupted_lit):
    teacher_uri, card = teacher_export
    checkpoints = s3_server.uri("lit-tests", "killed", "checkpoints")
    argv = lit_argv(encoded_cache, teacher_uri, card, checkpoints)
    saved_step = kill_driver_after_checkpoint(ray_cluster, argv, checkpoints)
    assert 0 < saved_step < STEPS
    result = ray_cluster.submit(argv, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert re.search(r"resumed from \S+ at step (\d+)", result.stdout + result.stderr)
    resumed = summary_of(result.stdout)
    assert resumed["step"] == STEPS
    expected = uninterrupted_lit["summary"]["replica_fingerprints"]
    assert resumed["replica_fingerprints"] == pytest.approx(expected, rel=1e-6)
