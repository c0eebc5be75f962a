"""Analytic FLOP count of the DiT family, from its config and token counts (for MFU and predicted speed-ups).

Conventions (those of the MFU figures in PaLM and Megatron-LM):
- one multiply-accumulate (MAC) is 2 FLOPs;
- only matmul-like work is counted: Linear layers, convolutions (patch embedding, depthwise convs) and the
  attention products (softmax: QKᵀ and AV; ReLU linear: kᵀv, q(kᵀv) and the normaliser q·Σk). Norms,
  activations, softmax, adaLN modulation, adds, the sinusoidal timestep features and the Fourier filter's
  FFT are O(tokens·width) without a width² factor and are left out;
- padded text tokens count: the model computes on them;
- a training step (forward + backward) is 3x the forward: the backward computes gradients with respect to
  both the inputs and the weights of every matmul, each as costly as the forward.

Counts are per sample; multiply by the batch size.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from trainer.models.config import DiTConfig

FLOPS_PER_MAC = 2
TRAIN_STEP_FORWARDS = 3  # forward + backward (input and weight gradients)
TIMESTEP_FEATURES = 256  # diffusers' sinusoidal timestep channels (CombinedTimestepTextProjEmbeddings)


def softmax_mixing_macs(queries: int, keys: int, dim: int) -> int:
    """QKᵀ and AV summed over heads: the head count cancels out."""
    return 2 * queries * keys * dim


def linear_mixing_macs(tokens: int, dim: int, heads: int) -> int:
    """ReLU linear attention: kᵀv (d_h x d_h per head), q(kᵀv), and the normaliser q·Σk."""
    head_dim = dim // heads
    return 2 * tokens * dim * head_dim + tokens * dim


def depthwise_conv_macs(tokens: int, channels: int, kernel: int) -> int:
    return tokens * channels * kernel * kernel


@dataclass(frozen=True)
class FlopCount:
    """Forward FLOPs of one sample, by component (names below), and the training-step total."""

    components: dict[str, int]

    @property
    def forward(self) -> int:
        return sum(self.components.values())

    @property
    def train_step(self) -> int:
        return TRAIN_STEP_FORWARDS * self.forward

    def share(self, *names: str) -> float:
        """Fraction of the forward spent in the named components."""
        return sum(self.components.get(name, 0) for name in names) / self.forward


def attention_macs(config: DiTConfig, softmax: bool, queries: int, image_tokens: int) -> Counter[str]:
    """A self-attention layer over `queries` tokens (the first `image_tokens` of them on the image grid)."""
    dim = config.dim
    macs: Counter[str] = Counter(attention_projections=4 * queries * dim * dim)  # QKV + output projection
    if softmax:
        macs["softmax_mixing"] += softmax_mixing_macs(queries, queries, dim)
    else:
        macs["linear_mixing"] += linear_mixing_macs(queries, dim, config.linear_heads or config.heads)
        if config.linear_value_conv:
            macs["value_conv"] += depthwise_conv_macs(image_tokens, dim, config.linear_value_conv)
    return macs


def ffn_macs(config: DiTConfig, tokens: int, image_tokens: int, pointwise: bool = False) -> Counter[str]:
    """Mix-FFN (gate+value in, depthwise conv on the image tokens' value half, out) or the pointwise MLP."""
    dim, hidden = config.dim, int(config.dim * config.mlp_ratio)
    if config.ffn == "mlp" or pointwise:
        return Counter(ffn=2 * tokens * dim * hidden)
    return Counter(ffn=3 * tokens * dim * hidden,
                   ffn_conv=depthwise_conv_macs(image_tokens, hidden, config.ffn_conv))


def cross_attention_macs(config: DiTConfig, image_tokens: int, text_tokens: int) -> int:
    """Image queries (q, out projections), text keys/values (kv projection), QKᵀ and AV."""
    dim = config.dim
    return (2 * image_tokens * dim * dim + 2 * text_tokens * dim * dim
            + softmax_mixing_macs(image_tokens, text_tokens, dim))


def block_macs(config: DiTConfig, softmax: bool, image_tokens: int, text_tokens: int, *, joint: bool = True,
               cross: bool = False, pointwise_ffn: bool = False) -> Counter[str]:
    """One DiTBlock: adaLN head, attention over [image, text] (or image only), cross-attention, FFN."""
    cond_dim = config.trunk_dim or config.dim
    seq = image_tokens + (text_tokens if joint else 0)
    macs: Counter[str] = Counter(adaln=cond_dim * 6 * config.dim)
    macs += attention_macs(config, softmax, seq, image_tokens)
    if cross:
        macs["cross_attention"] += cross_attention_macs(config, image_tokens, text_tokens)
    macs += ffn_macs(config, seq, image_tokens, pointwise_ffn)
    return macs


def model_flops(config: DiTConfig, image_tokens: int, text_tokens: int) -> FlopCount:
    """Forward FLOPs of `HybridDiT(config)` on one sample of `image_tokens` patches and `text_tokens` (padded) text."""
    dim, patch, channels = config.dim, config.patch_size, config.latent_channels
    cond_dim = config.trunk_dim or config.dim
    macs: Counter[str] = Counter(
        patch_embed=image_tokens * channels * patch * patch * dim,
        text_proj=text_tokens * config.text_dim * dim,
        # timestep MLP (256 -> D -> D), pooled-text MLP (text_dim -> D -> D), trunk (D -> trunk_dim)
        conditioning=TIMESTEP_FEATURES * dim + config.text_dim * dim + 2 * dim * dim
        + (dim * config.trunk_dim if config.trunk_dim else 0),
        final=cond_dim * 2 * dim + image_tokens * dim * patch * patch * channels,
    )
    for _ in range(config.refiner_depth):
        macs += block_macs(config, True, image_tokens, text_tokens, joint=False)  # image-only refiner
        macs += block_macs(config, True, 0, text_tokens, pointwise_ffn=True)  # text-only refiner
    for index in range(config.depth):
        softmax = config.is_full_attention(index)
        joint = config.text_drop_block is None or index < config.text_drop_block
        macs += block_macs(config, softmax, image_tokens, text_tokens, joint=joint,
                           cross=config.has_cross_attention(index))
    return FlopCount({name: FLOPS_PER_MAC * value for name, value in macs.items()})


def image_tokens_for(config: DiTConfig, latent_height: int, latent_width: int) -> int:
    """Patches of a latent of the given size."""
    if latent_height % config.patch_size or latent_width % config.patch_size:
        raise ValueError(f"latent {latent_height}x{latent_width} is not divisible by patch_size={config.patch_size}")
    return (latent_height // config.patch_size) * (latent_width // config.patch_size)
