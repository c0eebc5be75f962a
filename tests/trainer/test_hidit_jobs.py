"""Hi-DiT as a user of seed 004 runs it: the encode job writes a pixel-carrying cache of class folders, then
`ray job submit` runs stage 1 (latent only) and stage 2 (pixel branch on, continuing stage 1's global step), each
with the other models' checkpoint/resume guarantees."""

from __future__ import annotations

import re

import pytest
import torch

from pipelines.demo.corpus import load_digit_split, write_digit_class_folders
from services.cache.manifest import read_manifest
from tests.trainer.test_train_job import kill_driver_after_checkpoint, project_warnings, summary_of
from trainer.checkpoint import complete_steps, load_latest

# Each runs the encode job and the recipe's train jobs on a Ray cluster: minutes apiece on 2 cores, so `make
# test-slow`; the default suite covers the same recipes in process (test_loop.py, test_hidit_training.py).
pytestmark = pytest.mark.slow

ENCODE = "configs/encode/hidit-classfolder-taef2-pixels.yaml"
STAGE1, STAGE2 = "configs/train/hidit-stage1-tiny-cpu.yaml", "configs/train/hidit-stage2-tiny-cpu.yaml"
DIGITS = 64
# stage 2's max_steps counts both stages, as in the seed; a checkpoint every 10 steps leaves a killed job 30 to go
STAGE1_STEPS, STAGE2_STEPS = 40, 80


@pytest.fixture(scope="module")
def hidit_cache(ray_cluster, s3_server, tmp_path_factory):
    split = load_digit_split()
    root = tmp_path_factory.mktemp("hidit") / "digits"
    write_digit_class_folders(root, split.train_ink[:DIGITS], split.train_labels[:DIGITS], size=64)
    cache = s3_server.uri("hidit-tests", "cache")
    encode = ray_cluster.submit(["python", "pipelines/encode_latents.py", "--config", ENCODE,
                                 "--set", f"source.root={root}", "--set", f"output.uri={cache}"], timeout=600)
    assert encode.returncode == 0, (encode.stdout + encode.stderr)[-3000:]
    card = read_manifest(cache)
    assert card.pixels and card.num_samples == DIGITS and card.latent_channels == 32
    return cache


def stage_argv(config: str, cache: str, checkpoints: str, **changes) -> list[str]:
    overrides = {"data.uris": f"[{cache}]", "checkpoint.uri": checkpoints, "checkpoint.every_steps": 10,
                 "report_every": 5, "run_name": checkpoints.rsplit("/", 2)[-2], **changes}
    argv = ["python", "trainer/train.py", "--config", config]
    for key, value in overrides.items():
        argv += ["--set", f"{key}={value}"]
    return argv


def stage1_argv(cache: str, checkpoints: str) -> list[str]:
    return stage_argv(STAGE1, cache, checkpoints, max_steps=STAGE1_STEPS)


def stage2_argv(cache: str, checkpoints: str, stage1: str) -> list[str]:
    return stage_argv(STAGE2, cache, checkpoints, max_steps=STAGE2_STEPS, **{"checkpoint.resume_from": stage1})


def submit(cluster, argv: list[str]) -> tuple[dict, str]:
    result = cluster.submit(argv, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert project_warnings(log) == []
    return summary_of(result.stdout), log


@pytest.fixture(scope="module")
def stage1(ray_cluster, s3_server, hidit_cache):
    checkpoints = s3_server.uri("hidit-tests", "stage1", "checkpoints")
    summary, _ = submit(ray_cluster, stage1_argv(hidit_cache, checkpoints))
    return {**summary, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def stage2(ray_cluster, s3_server, hidit_cache, stage1):
    checkpoints = s3_server.uri("hidit-tests", "stage2", "checkpoints")
    summary, log = submit(ray_cluster, stage2_argv(hidit_cache, checkpoints, stage1["checkpoints"]))
    return {**summary, "checkpoints": checkpoints, "log": log}


def pixel_stream(checkpoints: str) -> dict[str, torch.Tensor]:
    model = load_latest(checkpoints).model
    return {name: tensor for name, tensor in model.items() if name.startswith("pixel_stream.")}


def test_stage_one_trains_the_latent_backbone_and_leaves_the_pixel_stream_as_initialised(stage1):
    assert stage1["step"] == STAGE1_STEPS and len(set(stage1["replica_fingerprints"])) == 1
    assert complete_steps(stage1["checkpoints"]) == [30, 40]
    weights = pixel_stream(stage1["checkpoints"])
    assert weights and all(torch.count_nonzero(tensor) == 0 for tensor in weights.values())


def test_stage_two_continues_stage_one_at_its_global_step_and_trains_the_pixel_branch(stage1, stage2):
    assert re.search(rf"continuing run \S+ from its step {STAGE1_STEPS}", stage2["log"])
    assert stage2["step"] == STAGE2_STEPS and len(set(stage2["replica_fingerprints"])) == 1
    assert complete_steps(stage2["checkpoints"]) == [70, 80]  # its own run: stage 1's checkpoints are left alone
    assert complete_steps(stage1["checkpoints"]) == [30, 40]
    weights = pixel_stream(stage2["checkpoints"])
    assert torch.count_nonzero(weights["pixel_stream.embed.weight"]) > 0
    assert torch.count_nonzero(weights["pixel_stream.head.final.linear.weight"]) > 0


def test_the_stage_two_export_generates_with_the_sde_sampler_a_guidance_interval_and_its_pixel_stream(stage2):
    from trainer.generation import generate_images, load_export
    from trainer.samplers import SamplerSettings

    pipeline = load_export(stage2["checkpoints"], "cpu")
    assert pipeline.model.config.pixel_stream
    settings = SamplerSettings(sampler="sde", steps=8, cfg=3.0, guidance_low=0.1, guidance_high=0.7, batch_size=2)
    images = generate_images(pipeline, ["a handwritten digit 3", "a handwritten digit 7"], settings)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    again = generate_images(pipeline, ["a handwritten digit 3", "a handwritten digit 7"], settings)
    assert torch.equal(images, again)
    # the pixel stream's own output: below the gate both streams are integrated and its pixels are the image
    hybrid = generate_images(pipeline, ["a handwritten digit 3", "a handwritten digit 7"],
                             settings.model_copy(update={"pixel_stream": True}))
    assert hybrid.shape == images.shape and torch.isfinite(hybrid).all() and not torch.equal(hybrid, images)


def test_a_killed_stage_one_job_resubmitted_resumes_and_ends_like_an_uninterrupted_run(
        ray_cluster, s3_server, hidit_cache, stage1):
    checkpoints = s3_server.uri("hidit-tests", "stage1-killed", "checkpoints")
    argv = stage1_argv(hidit_cache, checkpoints)
    saved = kill_driver_after_checkpoint(ray_cluster, argv, checkpoints)
    assert 0 < saved < STAGE1_STEPS
    resumed, log = submit(ray_cluster, argv)
    assert re.search(rf"resumed from \S+ at step {saved}", log)
    assert resumed["step"] == STAGE1_STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(stage1["replica_fingerprints"], rel=1e-6)


def test_a_killed_stage_two_job_resubmitted_resumes_its_own_checkpoint_and_ends_like_an_uninterrupted_run(
        ray_cluster, s3_server, hidit_cache, stage1, stage2):
    checkpoints = s3_server.uri("hidit-tests", "stage2-killed", "checkpoints")
    argv = stage2_argv(hidit_cache, checkpoints, stage1["checkpoints"])
    saved = kill_driver_after_checkpoint(ray_cluster, argv, checkpoints, after_step=STAGE1_STEPS)
    assert STAGE1_STEPS < saved < STAGE2_STEPS
    resumed, log = submit(ray_cluster, argv)
    assert re.search(rf"resumed from \S+ at step {saved}", log) and "continuing run" not in log
    assert resumed["step"] == STAGE2_STEPS
    assert resumed["replica_fingerprints"] == pytest.approx(stage2["replica_fingerprints"], rel=1e-6)
