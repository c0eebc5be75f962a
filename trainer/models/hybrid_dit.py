"""The hybrid DiT: image+text token funnel through linear-attention blocks and full-attention anchors."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from trainer.models.attention import (
    CrossAttention,
    Grid,
    LinearAttention,
    SoftmaxAttention,
    grid_to_image,
    rope_2d,
)
from trainer.models.config import DiTConfig
from trainer.models.layers import (
    MLP,
    AdaLNHead,
    Conditioning,
    FinalLayer,
    FourierFilter,
    MixFFN,
    RepaProjector,
    SubPixelHead,
    layer_norm,
    modulate,
)


class DiTBlock(nn.Module):
    """adaLN-Zero block over [image, text] tokens: attention (+ cross-attention, + Fourier filter), then FFN."""

    def __init__(self, dim: int, cond_dim: int, attn: nn.Module, ffn: nn.Module,
                 cross: CrossAttention | None = None, fourier: FourierFilter | None = None):
        super().__init__()
        self.norm1, self.norm2 = layer_norm(dim), layer_norm(dim)
        self.ada_ln = AdaLNHead(cond_dim, dim, 6)
        self.attn, self.ffn, self.cross, self.fourier = attn, ffn, cross, fourier

    def forward(self, image, text, text_mask, cond, grid: Grid, rope=None, joint: bool = True):
        """image (B, N, D) and text (B, L, D) -> updated pair; with `joint=False` text only feeds cross-attention."""
        n_image = image.shape[1]
        seq = torch.cat([image, text], dim=1) if joint else image
        key_mask = None
        if joint and text_mask is not None:
            key_mask = torch.cat([text_mask.new_ones(image.shape[:2]), text_mask], dim=1)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(cond)
        seq = seq + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(seq), shift1, scale1), key_mask, grid, rope)
        if self.fourier is not None or self.cross is not None:
            image, rest = seq[:, :n_image], seq[:, n_image:]
            if self.fourier is not None:
                image = image + self.fourier(image, grid)
            if self.cross is not None:
                image = image + self.cross(image, rest if joint else text, text_mask)
            seq = torch.cat([image, rest], dim=1)
        seq = seq + gate2.unsqueeze(1) * self.ffn(modulate(self.norm2(seq), shift2, scale2), grid)
        return seq[:, :n_image], (seq[:, n_image:] if joint else text)


def _ffn(config: DiTConfig, pointwise: bool = False) -> nn.Module:
    hidden = int(config.dim * config.mlp_ratio)
    if config.ffn == "mlp" or pointwise:
        return MLP(config.dim, hidden)
    return MixFFN(config.dim, hidden, config.ffn_conv)


def _block(config: DiTConfig, cond_dim: int, index: int) -> DiTBlock:
    grid = (config.latent_size // config.patch_size,) * 2
    if config.is_full_attention(index):
        attn = SoftmaxAttention(config.dim, config.heads)
    else:
        attn = LinearAttention(config.dim, config.linear_heads or config.heads, config.linear_value_conv)
    cross = CrossAttention(config.dim, config.heads) if config.has_cross_attention(index) else None
    fourier = FourierFilter(config.dim, grid) if config.fourier_filter else None
    return DiTBlock(config.dim, cond_dim, attn, _ffn(config), cross, fourier)


class DiTOutputs(NamedTuple):
    """What a forward that asks for more than the latent velocity returns."""

    velocity: torch.Tensor  # like x
    pixel_residual: torch.Tensor | None  # (B, 3, H*f, W*f) when pixels were given: see `PixelStream`
    repa_tokens: torch.Tensor | None  # (B, h*w, repa_dim) when repa=True
    grid: Grid


class PixelStream(nn.Module):
    """Hi-DiT's pixel branch: patchified noisy pixels added to the image tokens in the low-noise regime only, and
    the sub-pixel head that predicts, from the trunk's last features, the high-frequency part of the image: what the
    codec's decoding of the latent stream's clean estimate misses (`trainer.flow_matching.decoded_latent_estimate`).

    Why a residual: one token carries a whole (8·patch)² x 3 pixel patch, far more numbers than its width, so a head
    that predicts the whole image (or its velocity, mostly noise) is a low-rank bottleneck that cannot even match
    the codec; measured on digits, both stayed well above the codec's own error after 500 steps (README, "Does
    stage 2 pay?"). Added to the decoding, the zero-initialised head starts where stage 1 ends and only has to
    learn the small, structured correction."""

    def __init__(self, config: DiTConfig, cond_dim: int):
        super().__init__()
        self.gate_t = config.pixel_gate_t
        self.embed = nn.Conv2d(3, config.dim, config.pixel_patch, stride=config.pixel_patch)
        self.head = SubPixelHead(cond_dim, config.dim, config.pixel_patch)

    def gate(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) True where pixel tokens are injected: t < pixel_gate_t (t=1 is noise)."""
        return t < self.gate_t

    def inject(self, image: torch.Tensor, pixels: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """image tokens (B, N, D) + pixel tokens where gated; elsewhere `image` itself, bit for bit."""
        tokens = grid_to_image(self.embed(pixels))  # (B, N, D)
        if tokens.shape != image.shape:
            raise ValueError(f"pixels of shape {tuple(pixels.shape)} give {tokens.shape[1]} tokens for "
                             f"{image.shape[1]} latent tokens: pixels must be pixel_factor x the latent size")
        return torch.where(self.gate(t)[:, None, None], image + tokens, image)


class HybridDiT(nn.Module):
    """Velocity model `v(x_t, t, text)`; the config selects the hybrid, joint, LiT, single-stream or Hi-DiT variant.

    With `pixel_stream` (Hi-DiT) and noisy `pixels` given, or `repa=True`, it returns `DiTOutputs`; without
    them it is the latent-only model of Hi-DiT's stage 1 (and of sampling in latent space).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim, patch = config.dim, config.patch_size
        self.patch_embed = nn.Conv2d(config.latent_channels, dim, patch, stride=patch)
        self.text_proj = nn.Linear(config.text_dim, dim)
        self.conditioning = Conditioning(dim, config.text_dim, config.trunk_dim)
        cond_dim = self.conditioning.out_dim
        side = config.latent_size // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, side, side)) if config.position == "learned" else None
        # refiners prepare each stream alone before fusion: image with full attention, text with a pointwise FFN
        self.noise_refiner = nn.ModuleList(
            DiTBlock(dim, cond_dim, SoftmaxAttention(dim, config.heads), _ffn(config))
            for _ in range(config.refiner_depth)
        )
        self.context_refiner = nn.ModuleList(
            DiTBlock(dim, cond_dim, SoftmaxAttention(dim, config.heads), _ffn(config, pointwise=True))
            for _ in range(config.refiner_depth)
        )
        self.blocks = nn.ModuleList(_block(config, cond_dim, i) for i in range(config.depth))
        self.final = FinalLayer(cond_dim, dim, patch * patch * config.latent_channels)
        self.pixel_stream = PixelStream(config, cond_dim) if config.pixel_stream else None
        self.repa_projector = (RepaProjector(dim, config.repa_hidden, config.repa_dim)
                               if config.repa_depth is not None else None)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for projections; every adaLN head, cross-attention output, the final layer and the pixel stream's
        embedding and head start at zero (so switching the pixel branch on leaves a trained latent model as it was)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        patch_weight = self.patch_embed.weight
        nn.init.xavier_uniform_(patch_weight.view(patch_weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, AdaLNHead):
                nn.init.zeros_(module.linear.weight)
                nn.init.zeros_(module.linear.bias)
            if isinstance(module, CrossAttention):
                nn.init.zeros_(module.proj.weight)
                nn.init.zeros_(module.proj.bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        if self.pixel_stream is not None:
            for tensor in (self.pixel_stream.embed.weight, self.pixel_stream.embed.bias,
                           self.pixel_stream.head.final.linear.weight, self.pixel_stream.head.final.linear.bias):
                nn.init.zeros_(tensor)

    def embed_image(self, x: torch.Tensor) -> tuple[torch.Tensor, Grid]:
        """Latents (B, C, H, W) -> image tokens (B, h*w, D); the grid follows the input size."""
        patch = self.config.patch_size
        if x.shape[1] != self.config.latent_channels or x.shape[-2] % patch or x.shape[-1] % patch:
            raise ValueError(
                f"latents of shape {tuple(x.shape)} need {self.config.latent_channels} channels and sides "
                f"divisible by patch_size={patch}"
            )
        feature_map = self.patch_embed(x)
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != feature_map.shape[-2:]:
                pos = F.interpolate(pos, size=feature_map.shape[-2:], mode="bicubic", align_corners=False)
            feature_map = feature_map + pos
        return grid_to_image(feature_map), tuple(feature_map.shape[-2:])

    def forward(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                pixels: torch.Tensor | None = None, repa: bool = False) -> torch.Tensor | DiTOutputs:
        """x (B, C, H, W) noisy latents, t (B,) with t=1 noise, text (B, L, text_dim), mask True=real -> v like x.

        Hi-DiT: with `pixels` (B, 3, H*f, W*f), the noisy image at the same t in [-1, 1], the outputs carry the
        pixel stream's residual; with `repa`, the projected image tokens after `repa_depth` blocks.
        """
        if repa and self.repa_projector is None:
            raise ValueError("repa=True needs a model with repa_depth set")
        image, grid = self.embed_image(x)
        if pixels is not None:
            if self.pixel_stream is None:
                raise ValueError(f"pixels were given to a model without pixel_stream ({type(self).__name__})")
            image = self.pixel_stream.inject(image, pixels, t)
        tokens = self.text_proj(text)  # (B, L, D)
        cond = self.conditioning(t, text, text_mask)
        rope = None
        if self.config.position == "rope2d":
            rope = rope_2d(grid, self.config.dim // self.config.heads, x.device)
        for block in self.noise_refiner:
            image, _ = block(image, tokens, text_mask, cond, grid, rope, joint=False)
        for block in self.context_refiner:
            _, tokens = block(tokens[:, :0], tokens, text_mask, cond, (0, 0))
        for index, block in enumerate(self.blocks):
            # token funnel: from `text_drop_block` on, text tokens stop being processed (kept for cross-attention)
            joint = self.config.text_drop_block is None or index < self.config.text_drop_block
            image, tokens = block(image, tokens, text_mask, cond, grid, rope, joint=joint)
            if repa and index + 1 == self.config.repa_depth:
                repa_tokens = self.repa_projector(image)
        out = self.final(image, cond)  # (B, h*w, p*p*C)
        batch, patch = x.shape[0], self.config.patch_size
        velocity = F.pixel_shuffle(out.transpose(1, 2).reshape(batch, -1, *grid), patch)
        if pixels is None and not repa:
            return velocity
        return DiTOutputs(velocity, None if pixels is None else self.pixel_stream.head(image, cond, grid),
                          repa_tokens if repa else None, grid)
