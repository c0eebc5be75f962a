"""Hi-DiT's pixel stream: the time gate, the sub-pixel head, and stage 2 starting exactly where stage 1 left off."""

from __future__ import annotations

import pytest
import torch
from model_helpers import random_inputs, randomize_weights

from trainer.flow_matching import decoded_latent_estimate
from trainer.models import build_model, resolve_config
from trainer.models.layers import SubPixelHead


def hidit_inputs(config, t: list[float], seed: int = 0):
    x, _, text, mask = random_inputs(config, batch=len(t), seed=seed)
    side = config.latent_size * config.pixel_factor
    pixels = torch.randn(len(t), 3, side, side, generator=torch.Generator().manual_seed(seed + 1))
    return x, torch.tensor(t), text, mask, pixels


def test_pixel_branch_contributes_exactly_nothing_above_the_gate_threshold():
    model = randomize_weights(build_model("HiDiT-tiny")).eval()
    gate = model.config.pixel_gate_t
    x, t, text, mask, pixels = hidit_inputs(model.config, [gate, gate + 0.01, 0.7, 1.0])
    with torch.no_grad():
        latent_only = model(x, t, text, mask)
        hybrid = model(x, t, text, mask, pixels=pixels).velocity
    assert latent_only.abs().max() > 0
    assert torch.equal(hybrid, latent_only)  # bit for bit: the gate is a select, not a multiply


def test_pixel_tokens_change_the_latent_velocity_below_the_threshold():
    model = randomize_weights(build_model("HiDiT-tiny")).eval()
    gate = model.config.pixel_gate_t
    x, t, text, mask, pixels = hidit_inputs(model.config, [0.0, gate / 2, gate - 1e-3])
    with torch.no_grad():
        latent_only = model(x, t, text, mask)
        hybrid = model(x, t, text, mask, pixels=pixels).velocity
    for row in range(len(t)):
        assert not torch.allclose(hybrid[row], latent_only[row]), f"sample {row} at t={t[row].item()}"


def test_gate_threshold_is_a_setting():
    config = resolve_config("HiDiT-tiny").model_copy(update={"pixel_gate_t": 0.9})
    model = randomize_weights(build_model(config)).eval()
    x, t, text, mask, pixels = hidit_inputs(config, [0.8, 0.95])
    with torch.no_grad():
        latent_only = model(x, t, text, mask)
        hybrid = model(x, t, text, mask, pixels=pixels).velocity
    assert not torch.allclose(hybrid[0], latent_only[0])
    assert torch.equal(hybrid[1], latent_only[1])


@pytest.mark.parametrize(("grid", "patch", "dim"), [((4, 4), 16, 64), ((2, 3), 4, 32), ((1, 1), 8, 16)])
def test_sub_pixel_head_maps_tokens_to_the_image_grid(grid, patch, dim):
    head = SubPixelHead(cond_dim=12, dim=dim, pixel_patch=patch)
    torch.nn.init.normal_(head.final.linear.weight)
    tokens = torch.randn(2, grid[0] * grid[1], dim)
    out = head(tokens, torch.randn(2, 12), grid)
    assert out.shape == (2, 3, grid[0] * patch, grid[1] * patch)
    # PixelShuffle: token (i, j) fills exactly the patch at (i·p, j·p); changing it changes nothing else.
    changed = tokens.clone()
    changed[:, 0] += 1
    cond = torch.randn(2, 12)
    delta = (head(changed, cond, grid) - head(tokens, cond, grid)).abs()
    assert delta[..., :patch, :patch].sum() > 0
    delta[..., :patch, :patch] = 0
    assert delta.sum() == 0


def test_model_returns_the_pixel_residual_at_image_size_and_both_heads_start_at_zero():
    model = build_model("HiDiT-tiny")
    x, t, text, mask, pixels = hidit_inputs(model.config, [0.1, 0.9])
    velocity, pixel_residual, _, _ = model(x, t, text, mask, pixels=pixels)
    assert velocity.shape == x.shape and pixel_residual.shape == pixels.shape
    assert torch.count_nonzero(velocity) == 0 and torch.count_nonzero(pixel_residual) == 0


def test_the_clean_image_decodes_the_latent_estimate_without_gradient():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    velocity = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.tensor([0.1, 0.25])
    seen = []

    def decode(latents):
        seen.append(latents)
        return torch.sigmoid(latents[:, :3])

    decoded = decoded_latent_estimate(x, t, velocity, decode)
    torch.testing.assert_close(seen[0], x.detach() - t.view(-1, 1, 1, 1) * velocity.detach())
    torch.testing.assert_close(decoded, torch.sigmoid(seen[0][:, :3]) * 2 - 1)
    assert not decoded.requires_grad  # the frozen codec passes no gradient back into the latent stream


def test_a_trained_latent_model_is_unchanged_when_its_fresh_pixel_branch_switches_on():
    # Stage 2 starts from stage 1, whose pixel embedding and head were never trained (still zero).
    model = randomize_weights(build_model("HiDiT-tiny")).eval()
    fresh = build_model("HiDiT-tiny").pixel_stream.state_dict()
    model.pixel_stream.load_state_dict(fresh)
    x, t, text, mask, pixels = hidit_inputs(model.config, [0.05, 0.2])
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask, pixels=pixels).velocity, model(x, t, text, mask))


def test_pixels_of_the_wrong_size_are_an_error_naming_the_factor():
    model = build_model("HiDiT-tiny")
    x, t, text, mask, pixels = hidit_inputs(model.config, [0.1])
    with pytest.raises(ValueError, match="pixel_factor"):
        model(x, t, text, mask, pixels=pixels[..., :-8, :-8])


def test_pixels_for_a_model_without_a_pixel_stream_are_an_error():
    model = build_model("JointDiT-tiny")
    x, t, text, mask = random_inputs(model.config, batch=1)
    with pytest.raises(ValueError, match="pixel_stream"):
        model(x, t, text, mask, pixels=torch.zeros(1, 3, 64, 64))
