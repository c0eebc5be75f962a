"""The training loop without Ray: exact resume, learning, validation bins, distillation."""

from __future__ import annotations

import pytest
import torch

from pipelines.demo.synthetic_cache import write_tiny_cache
from trainer import checkpoint as ckpt
from trainer.config import TrainJobConfig
from trainer.export import LatentNormalisation
from trainer.inputs import resolve_cache
from trainer.loop import TrainingRun


@pytest.fixture(scope="module")
def cache_uri(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache") / "cache")
    write_tiny_cache(root, shard_sizes=[16, 16, 16, 16, 8])
    return root


def job(cache_uri, checkpoint_uri, **changes) -> TrainJobConfig:
    base = dict(data=dict(uris=[cache_uri], shuffle_window_shards=2), model=dict(preset="HybridDiT-tiny"),
                batch_size=8, max_steps=12, report_every=4, optimizer=dict(lr=2e-3), ema=dict(decay=0.9),
                checkpoint=dict(uri=checkpoint_uri, every_steps=5, keep_last=2))
    return TrainJobConfig.model_validate({**base, **changes})


def resume_after_a_kill_at_step_7(straight: TrainingRun, config) -> TrainingRun:
    """Run `config` killed at step 7 (its last checkpoint: step 5), resume it to the end, and check that its model
    and EMA equal those of the finished uninterrupted run `straight` bit for bit; the resumed run."""
    dataset = resolve_cache(config)
    TrainingRun(config, dataset, stop_after=7).run()
    resumed = TrainingRun(config, dataset)
    assert resumed.step == 5
    resumed.run()
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    for name, tensor in straight.ema.state_dict().items():
        assert torch.equal(tensor, resumed.ema.state_dict()[name]), name
    return resumed


def test_an_interrupted_and_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(cache_uri, tmp_path):
    config = job(cache_uri, str(tmp_path / "straight"))
    straight = TrainingRun(config, resolve_cache(config))
    straight.run()
    resumed = resume_after_a_kill_at_step_7(straight, job(cache_uri, str(tmp_path / "resumed")))
    assert straight.position == resumed.position


@pytest.mark.slow
def test_held_out_loss_falls_on_a_learnable_cache(cache_uri, tmp_path):
    config = job(cache_uri, str(tmp_path / "ckpt"), max_steps=40, cfg_dropout=0.0,
                 optimizer=dict(lr=3e-3, warmup_fraction=0.1), checkpoint=dict(uri=str(tmp_path / "ckpt"), every_steps=1000),
                 validation=dict(holdout_shards=1, every_steps=1000, max_batches=1))
    trainer = TrainingRun(config, resolve_cache(config))
    before = trainer.validate()["val_loss"]
    trainer.run()
    assert trainer.validate()["val_loss"] < 0.92 * before


def test_validation_reports_one_loss_per_t_bin_on_held_out_shards(cache_uri, tmp_path):
    config = job(cache_uri, str(tmp_path / "ckpt"), max_steps=2,
                 validation=dict(holdout_shards=1, t_grid=[0.25, 0.75], every_steps=2, max_batches=1))
    dataset = resolve_cache(config)
    assert len(dataset.validation_shards) == 1 and len(dataset.train_shards) == 4
    reports = []
    TrainingRun(config, dataset, reporter=reports.append).run()
    validation = next(report for report in reports if "val_loss" in report)
    assert set(validation) == {"step", "val_loss", "val_loss_t0.25", "val_loss_t0.75"}
    assert all(0 < value < 10 for value in validation.values())


def test_the_final_checkpoint_exports_the_ema_weights_for_generate(cache_uri, tmp_path):
    from trainer.export import load_exported_model

    config = job(cache_uri, str(tmp_path / "ckpt"), max_steps=3)
    trainer = TrainingRun(config, resolve_cache(config))
    trainer.run()
    model, exported = load_exported_model(tmp_path / "ckpt" / ckpt.step_dir_name(3) / ckpt.EXPORT_DIR)
    for name, tensor in trainer.ema.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    assert exported.codec == {"name": "pixel"}


def export_for_cache(directory, model, cache_uri):
    """An export of `model` as a run on the cache at `cache_uri` writes it (the cache's codec, text encoder and
    latent normalisation)."""
    from trainer.export import save_exported_model

    cache = resolve_cache(job(cache_uri, "unused"))
    return save_exported_model(directory, model, codec=cache.codec, text_encoder=cache.text_encoder,
                               latent_normalisation=cache.latent_normalisation)


def test_distillation_from_an_identical_teacher_adds_nothing_to_the_loss(cache_uri, tmp_path):
    from trainer.models import build_model

    torch.manual_seed(0)  # the student's initial weights (TrainingRun seeds with config.seed=0)
    teacher_dir = export_for_cache(tmp_path / "teacher", build_model("HybridDiT-tiny"), cache_uri)
    plain_config = job(cache_uri, str(tmp_path / "plain"), max_steps=1)
    distill_config = job(cache_uri, str(tmp_path / "distill"), max_steps=1, teacher=str(teacher_dir),
                         distill_noise_lambda=5.0, distill_var_lambda=5.0)
    plain, distilled = [], []
    TrainingRun(plain_config, resolve_cache(plain_config), reporter=lambda m: plain.append(m["loss"])).run()
    trainer = TrainingRun(distill_config, resolve_cache(distill_config), reporter=lambda m: distilled.append(m["loss"]))
    trainer.run()
    assert distilled == pytest.approx(plain)
    assert trainer.objective.teacher is not None


def test_sample_grids_from_fixed_prompts_are_uploaded_next_to_the_checkpoints(tmp_path):
    cache = str(tmp_path / "pixel-cache")
    write_tiny_cache(cache, shard_sizes=[8], channels=12, codec={"name": "pixel", "tiny": False, "factor": 2},
                     text_encoder={"name": "minilm", "tiny": True, "max_length": 256})
    config = job(cache, str(tmp_path / "ckpt"), max_steps=2, model=dict(preset="HybridDiT-tiny",
                                                                          overrides={"latent_channels": 12}),
                 samples=dict(prompts=["a red square", "a blue circle"], every_steps=2, steps=2))
    TrainingRun(config, resolve_cache(config)).run()
    grid = tmp_path / "ckpt" / "samples" / ckpt.step_dir_name(2) / "grid.png"
    from PIL import Image

    assert Image.open(grid).size == (32, 16)  # two 16 px images side by side


def shifted_teacher(preset: str) -> torch.nn.Module:
    """A model of `preset` whose every weight differs from any fresh initialisation."""
    from trainer.models import build_model

    teacher = build_model(preset)
    with torch.no_grad():
        for param in teacher.parameters():
            param.add_(1.0)
    return teacher


def test_init_from_inherits_every_weight_of_a_trained_model_except_the_linear_attention(cache_uri, tmp_path):
    from trainer.inheritance import linear_attention_weights

    teacher = shifted_teacher("HybridDiT-tiny")
    teacher_dir = export_for_cache(tmp_path / "teacher", teacher, cache_uri)
    config = job(cache_uri, str(tmp_path / "ckpt"), max_steps=1, init_from=str(teacher_dir))
    run = TrainingRun(config, resolve_cache(config))
    student, taught = run.model.state_dict(), teacher.state_dict()
    linear = linear_attention_weights(run.model)
    assert linear and len(linear) < len(student)
    for name, tensor in student.items():
        assert torch.equal(tensor, taught[name]) != (name in linear), name
        assert torch.equal(run.ema.state_dict()[name], tensor), name  # the EMA starts from the inherited weights


def lit_job(cache_uri, tmp_path, checkpoint_dir: str, **changes) -> TrainJobConfig:
    """LiT's recipe on the tiny cache: LiT-T2I-tiny inherits from and distils a CrossDiT-tiny teacher."""
    from tests.model.model_helpers import randomize_weights
    from trainer.models import build_model

    teacher_dir = tmp_path / "cross-teacher"
    if not teacher_dir.exists():  # every weight non-zero and unlike a fresh initialisation, as after training
        export_for_cache(teacher_dir, randomize_weights(build_model("CrossDiT-tiny"), seed=3, std=0.1), cache_uri)
    recipe = dict(model=dict(preset="LiT-T2I-tiny"), teacher=str(teacher_dir), init_from=str(teacher_dir))
    return job(cache_uri, str(tmp_path / checkpoint_dir), **{**recipe, **changes})


def test_an_interrupted_and_resumed_lit_run_ends_bitwise_equal_to_an_uninterrupted_one(cache_uri, tmp_path):
    config = lit_job(cache_uri, tmp_path, "straight")
    straight = TrainingRun(config, resolve_cache(config))
    assert straight.objective.teacher is not None
    straight.run()
    resume_after_a_kill_at_step_7(straight, lit_job(cache_uri, tmp_path, "resumed"))


def test_a_teacher_trained_on_other_encoders_is_refused_naming_both(cache_uri, tmp_path):
    from trainer.export import save_exported_model
    from trainer.inputs import check_teacher
    from trainer.models import build_model

    teacher_dir = save_exported_model(tmp_path / "teacher", build_model("CrossDiT-tiny"), codec={"name": "taef2"},
                                      text_encoder={"name": "tiny-test"})
    config = lit_job(cache_uri, tmp_path, "ckpt", teacher=str(teacher_dir))
    cache = resolve_cache(config)
    with pytest.raises(ValueError, match=r"codec \{'name': 'taef2'\}, but this run's cache has \{'name': 'pixel'\}"):
        check_teacher(config, cache)
    with pytest.raises(ValueError, match="text encoder"):
        TrainingRun(config.model_copy(update={"teacher": str(save_exported_model(
            tmp_path / "teacher-minilm", build_model("CrossDiT-tiny"), codec=cache.codec,
            text_encoder={"name": "minilm"}, latent_normalisation=cache.latent_normalisation))}), cache)
    with pytest.raises(ValueError, match="latent normalisation"):
        check_teacher(config.model_copy(update={"teacher": str(save_exported_model(
            tmp_path / "teacher-scaled", build_model("CrossDiT-tiny"), codec=cache.codec,
            text_encoder=cache.text_encoder, latent_normalisation=LatentNormalisation(scale=0.5)))}), cache)
