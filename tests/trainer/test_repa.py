"""REPA: the pluggable frozen feature encoder, its missing-weights error, the alignment term, a run that trains it."""

from __future__ import annotations

import pytest
import torch

from pipelines.demo.synthetic_cache import write_tiny_cache
from trainer.config import TrainJobConfig
from trainer.inputs import resolve_cache
from trainer.loop import TrainingRun
from trainer.representation import MissingWeightsError, build_feature_encoder
from trainer.step import repa_term


def test_dinov2_without_local_weights_is_an_error_naming_the_weights_and_how_to_get_them():
    with pytest.raises(MissingWeightsError, match=r"'facebook/dinov2-small'.*hf download facebook/dinov2-small"):
        build_feature_encoder("facebook/dinov2-small")


def test_a_directory_without_a_dinov2_model_is_an_error_naming_it(tmp_path):
    with pytest.raises(MissingWeightsError, match=str(tmp_path)):
        build_feature_encoder(str(tmp_path))


def test_an_unknown_encoder_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="facebook/dinov2-small"):
        build_feature_encoder("clip-vit")


@pytest.mark.parametrize("grid", [(4, 4), (2, 3), (8, 8)])
def test_feature_encoder_gives_frozen_features_on_the_token_grid(grid):
    encoder = build_feature_encoder("tiny-dinov2")
    features = encoder(torch.rand(2, 3, 64, 48), grid)
    assert features.shape == (2, grid[0] * grid[1], encoder.dim)
    assert not any(parameter.requires_grad for parameter in encoder.parameters())


def test_repa_term_is_minus_one_when_aligned_and_ignores_zero_weight_samples():
    features = torch.randn(3, 5, 8)
    assert repa_term(features * 2, features, torch.ones(3)).item() == pytest.approx(-1.0)
    mixed = torch.stack([features[0], -features[1], features[2]])
    assert repa_term(mixed, features, torch.tensor([1.0, 0.0, 1.0])).item() == pytest.approx(-1.0)


def test_a_run_with_repa_trains_the_projector_towards_the_encoder_features(tmp_path):
    cache = str(tmp_path / "cache")
    write_tiny_cache(cache, shard_sizes=[16, 16], pixel_factor=8)
    config = TrainJobConfig.model_validate(dict(
        data=dict(uris=[cache], loader_process=False),
        model=dict(preset="HiDiT-tiny", overrides=dict(repa_depth=2, repa_dim=32, repa_hidden=64)),
        repa=dict(encoder="tiny-dinov2", weight=1.0), batch_size=8, max_steps=4, report_every=4, cfg_dropout=0.0,
        optimizer=dict(lr=2e-3, warmup_fraction=0.0), checkpoint=dict(uri=str(tmp_path / "ckpt"), every_steps=4)))
    run = TrainingRun(config, resolve_cache(config))
    before = {name: tensor.clone() for name, tensor in run.model.repa_projector.state_dict().items()}
    run.run()
    after = run.model.repa_projector.state_dict()
    assert all(not torch.equal(after[name], tensor) for name, tensor in before.items())


def test_repa_with_an_encoder_of_another_width_is_an_error_naming_repa_dim(tmp_path):
    cache = str(tmp_path / "cache")
    write_tiny_cache(cache, shard_sizes=[8], pixel_factor=8)
    config = TrainJobConfig.model_validate(dict(
        data=dict(uris=[cache], loader_process=False),
        model=dict(preset="HiDiT-tiny", overrides=dict(repa_depth=2, repa_dim=384)),
        repa=dict(encoder="tiny-dinov2"), batch_size=8, max_steps=1, checkpoint=dict(uri=str(tmp_path / "ckpt"))))
    with pytest.raises(ValueError, match="repa_dim"):
        TrainingRun(config, resolve_cache(config))
