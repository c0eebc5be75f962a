"""Hi-DiT's two training stages without Ray: stage 1 latent-only, stage 2 continuing it with the pixel branch."""

from __future__ import annotations

import pytest
import torch

from pipelines.demo.synthetic_cache import write_tiny_cache
from trainer.config import TrainJobConfig
from trainer.inputs import resolve_cache
from trainer.loop import TrainingRun

# Stage 2 decodes the latent estimate with the cache's codec: the real taef2 tree (seeded weights), f8 with 32 channels.
TAEF2_LATENTS = dict(channels=32, codec={"name": "taef2", "tiny": True})


@pytest.fixture(scope="module")
def pixel_cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache") / "pixels")
    write_tiny_cache(root, shard_sizes=[16, 16, 8], pixel_factor=8, **TAEF2_LATENTS)
    return root


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache") / "latents")
    write_tiny_cache(root, shard_sizes=[8], **TAEF2_LATENTS)
    return root


def job(cache_uri, checkpoint_uri, **changes) -> TrainJobConfig:
    base = dict(data=dict(uris=[cache_uri], shuffle_window_shards=2, loader_process=False),
                model=dict(preset="HiDiT-tiny", overrides=dict(latent_channels=32)), batch_size=8, max_steps=6,
                report_every=2, optimizer=dict(lr=2e-3, warmup_fraction=0.0), ema=dict(decay=0.9), cfg_dropout=0.0,
                checkpoint=dict(uri=checkpoint_uri, every_steps=3, keep_last=2))
    return TrainJobConfig.model_validate({**base, **changes})


def pixel_weights(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items() if name.startswith("pixel_stream.")}


def test_stage_one_leaves_the_pixel_stream_untouched(pixel_cache, tmp_path):
    config = job(pixel_cache, str(tmp_path / "stage1"))
    run = TrainingRun(config, resolve_cache(config))
    before = pixel_weights(run.model)
    run.run()
    assert all(torch.equal(tensor, before[name]) for name, tensor in pixel_weights(run.model).items())
    assert all(torch.count_nonzero(tensor) == 0 for tensor in before.values() if tensor.ndim > 1)


def test_stage_two_continues_stage_one_at_its_global_step_and_trains_the_pixel_stream(pixel_cache, tmp_path):
    stage1 = job(pixel_cache, str(tmp_path / "stage1"))
    first = TrainingRun(stage1, resolve_cache(stage1))
    first.run()
    stage2 = job(pixel_cache, str(tmp_path / "stage2"), max_steps=10, pixel_branch=dict(weight=1.0),
                 timesteps=dict(distribution="uniform"),
                 checkpoint=dict(uri=str(tmp_path / "stage2"), every_steps=3, resume_from=str(tmp_path / "stage1")))
    second = TrainingRun(stage2, resolve_cache(stage2))
    assert second.step == 6 and second.position == first.position
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name
    before = pixel_weights(second.model)
    second.run()
    assert second.step == 10
    changed = [name for name, tensor in pixel_weights(second.model).items() if not torch.equal(tensor, before[name])]
    assert "pixel_stream.embed.weight" in changed and "pixel_stream.head.final.linear.weight" in changed


def test_stage_two_resumes_from_its_own_checkpoint_bitwise(pixel_cache, tmp_path):
    stage1 = job(pixel_cache, str(tmp_path / "stage1"), max_steps=3)
    TrainingRun(stage1, resolve_cache(stage1)).run()

    def stage2(name: str) -> TrainJobConfig:
        return job(pixel_cache, str(tmp_path / name), max_steps=9, pixel_branch=dict(weight=0.5),
                   checkpoint=dict(uri=str(tmp_path / name), every_steps=3, resume_from=str(tmp_path / "stage1")))

    straight = TrainingRun(stage2("straight"), resolve_cache(stage2("straight")))
    straight.run()
    TrainingRun(stage2("killed"), resolve_cache(stage2("killed")), stop_after=4).run()  # last checkpoint: step 6
    resumed = TrainingRun(stage2("killed"), resolve_cache(stage2("killed")))
    assert resumed.step == 6
    resumed.run()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_stage_two_on_a_cache_without_pixels_is_an_error_naming_the_encode_option(latent_cache, tmp_path):
    config = job(latent_cache, str(tmp_path / "ckpt"), pixel_branch=dict(weight=1.0))
    with pytest.raises(ValueError, match="store_pixels"):
        TrainingRun(config, resolve_cache(config))


def test_stage_two_needs_a_model_with_a_pixel_stream(pixel_cache, tmp_path):
    config = job(pixel_cache, str(tmp_path / "ckpt"), pixel_branch=dict(weight=1.0),
                 model=dict(preset="JointDiT-tiny", overrides=dict(latent_channels=32)))
    with pytest.raises(ValueError, match="no pixel stream"):
        TrainingRun(config, resolve_cache(config))


def test_resume_from_a_run_without_checkpoints_is_an_error(pixel_cache, tmp_path):
    config = job(pixel_cache, str(tmp_path / "ckpt"), checkpoint=dict(uri=str(tmp_path / "ckpt"),
                                                                        resume_from=str(tmp_path / "nothing")))
    with pytest.raises(FileNotFoundError, match="resume_from"):
        TrainingRun(config, resolve_cache(config))
