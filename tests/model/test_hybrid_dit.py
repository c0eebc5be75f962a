import pytest
import torch
from model_helpers import TINY_PRESETS, random_inputs, randomize_weights

from trainer.flow_matching import TimestepSampling, flow_matching_loss
from trainer.models import MODEL_PRESETS, build_model, resolve_config
from trainer.models.hybrid_dit import DiTBlock


def test_model_output_is_zero_at_init(tiny_model):
    x, t, text, mask = random_inputs(tiny_model.config)
    assert torch.count_nonzero(tiny_model(x, t, text, mask)) == 0


def test_every_block_is_identity_on_its_input_at_init(tiny_model):
    x, t, text, mask = random_inputs(tiny_model.config)
    image, grid = tiny_model.embed_image(x)
    tokens = tiny_model.text_proj(text)
    cond = tiny_model.conditioning(t, text, mask)
    blocks = [m for m in tiny_model.modules() if isinstance(m, DiTBlock)]
    assert len(blocks) == tiny_model.config.depth + 2 * tiny_model.config.refiner_depth
    for block in blocks:
        out_image, out_text = block(image, tokens, mask, cond, grid)
        assert torch.equal(out_image, image) and torch.equal(out_text, tokens)


def test_padding_tokens_do_not_change_image_outputs(tiny_model):
    model = randomize_weights(tiny_model).eval()
    x, t, text, mask = random_inputs(model.config, batch=1, text_len=4)
    garbage = torch.randn(1, 7, model.config.text_dim) * 50
    padded_text = torch.cat([text, garbage], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        reference = model(x, t, text, mask)
        padded = model(x, t, padded_text, padded_mask)
    assert reference.abs().max() > 0
    torch.testing.assert_close(padded, reference, rtol=1e-4, atol=1e-5)


def test_output_follows_non_square_latent_size(tiny_model):
    model = randomize_weights(tiny_model)
    patch = model.config.patch_size
    x, t, text, mask = random_inputs(model.config, size=(6 * patch, 10 * patch))
    out = model(x, t, text, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_token_funnel_drops_text_tokens_from_later_blocks():
    model = randomize_weights(build_model({**build_model("HybridDiT-tiny").config.model_dump(), "text_drop_block": 2}))
    x, t, text, mask = random_inputs(model.config, batch=1)
    seen = []
    hook = model.blocks[3].attn.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[1]))
    model(x, t, text, mask)
    hook.remove()
    assert seen == [x.shape[-2] * x.shape[-1]]


def test_wrong_latent_channels_raise_naming_the_shape():
    model = build_model("HybridDiT-tiny")
    with pytest.raises(ValueError, match="channels"):
        model(torch.zeros(1, 3, 8, 8), torch.zeros(1), torch.zeros(1, 2, 32), None)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = build_model("HybridDiT-tiny")
    x0, _, text, mask = random_inputs(model.config, batch=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        # the same t and noise every step: one fixed batch whose target the model can memorise
        loss, _, _ = flow_matching_loss(model, x0, text, mask, sampling=TimestepSampling(),
                                        generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= losses[0] / 10, f"loss went {losses[0]:.4f} -> {losses[-1]:.4f}"


def test_config_rejects_full_attention_block_beyond_depth():
    with pytest.raises(ValueError, match=r"full_attention_blocks \[12\]"):
        resolve_config({"full_attention_blocks": [2, 12]})


def test_every_preset_builds_from_its_name():
    assert set(MODEL_PRESETS) >= {"HybridDiT-148M", "JointDiT-B/2", "LiT-B/2", "SingleStreamDiT-B/2"}
    for name in TINY_PRESETS:
        assert build_model(name).config == MODEL_PRESETS[name]
