"""The analytic FLOP counter against a hand count and against torch's FlopCounterMode on the real models."""

from __future__ import annotations

import pytest
import torch
from model_helpers import TINY_PRESETS, random_inputs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from trainer.flops import image_tokens_for, model_flops
from trainer.models import DiTConfig, build_model, resolve_config

# 4 image tokens (4x4 latent, patch 2), 3 text tokens, width 16, Mix-FFN hidden 32, trunk 8,
# block 0 ReLU-linear (2 heads of 8), block 1 softmax + cross-attention.
HAND_CONFIG = DiTConfig(latent_channels=4, latent_size=4, patch_size=2, text_dim=8, text_len=3, dim=16, heads=2,
                        depth=2, full_attention_blocks=[1], mlp_ratio=2, ffn_conv=3, trunk_dim=8)


def test_forward_flops_match_a_hand_count_of_a_tiny_config():
    n, text, seq, dim, hidden = 4, 3, 7, 16, 32  # seq = image + text tokens in the joint blocks
    macs = {
        "patch_embed": n * 4 * 2 * 2 * dim,  # 1024
        "text_proj": text * 8 * dim,  # 384
        "conditioning": 256 * dim + 8 * dim + 2 * dim * dim + dim * 8,  # timestep MLP, pooled-text MLP, trunk: 4864
        "final": 8 * 2 * dim + n * dim * 2 * 2 * 4,  # adaLN head + patch velocities: 1280
        "adaln": 2 * 8 * 6 * dim,  # one 6-vector head per block: 1536
        "attention_projections": 2 * 4 * seq * dim * dim,  # QKV + out, both blocks: 14336
        "linear_mixing": 2 * seq * dim * 8 + seq * dim,  # kᵀv, q(kᵀv), q·Σk: 1904
        "softmax_mixing": 2 * seq * seq * dim,  # QKᵀ, AV: 1568
        "cross_attention": 2 * n * dim * dim + 2 * text * dim * dim + 2 * n * text * dim,  # 3968
        "ffn": 2 * 3 * seq * dim * hidden,  # gate+value in, out: 21504
        "ffn_conv": 2 * n * hidden * 3 * 3,  # depthwise 3x3 on the image tokens: 2304
    }
    assert sum(macs.values()) == 54672
    count = model_flops(HAND_CONFIG, image_tokens=n, text_tokens=text)
    assert count.components == {name: 2 * value for name, value in macs.items()}
    assert count.forward == 2 * 54672
    assert count.train_step == 3 * 2 * 54672
    assert count.share("softmax_mixing") == pytest.approx(1568 / 54672)


def _grouped_conv_backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                           output_padding, groups, output_mask, out_shape=None, **_):
    """Each requested gradient of a (non-transposed) conv costs one forward; FlopCounterMode's own formula
    ignores `groups` and counts a depthwise conv's weight gradient once per channel."""
    return sum(output_mask[:2]) * conv_flop_count(x_shape, w_shape, grad_out_shape)


def _counted_by_torch(model, inputs, train: bool) -> int:
    # CPU SDPA runs a fused kernel (_scaled_dot_product_flash_attention_for_cpu) for which FlopCounterMode has
    # no formula: the softmax attention would count as 0. The math backend runs it as the bmm's it counts.
    mapping = {torch.ops.aten.convolution_backward: _grouped_conv_backward}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = model(*inputs)
        if train:
            out.square().mean().backward()
    return counter.get_total_flops()


VARIANTS = [(name, {}) for name in TINY_PRESETS] + [("HybridDiT-tiny", {"text_drop_block": 2})]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS, ids=[f"{p}{'-funnel' if o else ''}" for p, o in VARIANTS])
def test_flops_agree_with_torch_flop_counter_on_the_real_model(preset, overrides):
    config = DiTConfig.model_validate({**resolve_config(preset).model_dump(), **overrides})
    torch.manual_seed(0)
    model = build_model(config)
    batch, text_len = 2, 6
    inputs = random_inputs(config, batch=batch, text_len=text_len)
    count = model_flops(config, image_tokens_for(config, config.latent_size, config.latent_size), text_len)
    # The forward counts the very same matmuls (the Fourier filter's FFT is left out by both).
    assert _counted_by_torch(model, inputs, train=False) == pytest.approx(batch * count.forward, rel=1e-6)
    # Forward + backward: within 1%, the patch embedding computes no gradient for the input latents.
    assert _counted_by_torch(model, inputs, train=True) == pytest.approx(batch * count.train_step, rel=0.01)


def test_image_tokens_for_rejects_a_latent_the_patch_does_not_divide():
    with pytest.raises(ValueError, match="not divisible by patch_size=2"):
        image_tokens_for(HAND_CONFIG, 5, 4)
