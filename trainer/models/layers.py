"""The DiT's non-attention parts: conditioning, adaLN modulation, feed-forward, Fourier filter, output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from torch import nn

from trainer.models.attention import Grid, depthwise_grid_conv, grid_to_image, image_to_grid


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: `x·(1+scale)+shift` with per-sample (B, D) shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens (B, L, D) -> (B, D); an all-padding row pools to zero."""
    if mask is None:
        return tokens.mean(dim=1)
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def layer_norm(dim: int) -> nn.LayerNorm:
    """Affine-free LayerNorm: adaLN supplies scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class Conditioning(nn.Module):
    """Timestep embedding + pooled-text embedding -> the shared conditioning trunk every adaLN head reads."""

    def __init__(self, dim: int, text_dim: int, trunk_dim: int | None):
        super().__init__()
        # sinusoidal t (x1000, the range diffusers' embedding frequencies are laid out for) + pooled-text MLP
        self.embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim, pooled_projection_dim=text_dim)
        self.trunk = nn.Sequential(nn.SiLU(), nn.Linear(dim, trunk_dim), nn.SiLU()) if trunk_dim else nn.SiLU()
        self.out_dim = trunk_dim or dim

    def forward(self, t: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        return self.trunk(self.embed(t * 1000, masked_mean(text, text_mask)))  # (B, out_dim)


class AdaLNHead(nn.Module):
    """A block's own zero-initialised head: trunk output -> `n` modulation vectors of width `dim`."""

    def __init__(self, cond_dim: int, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(cond_dim, n * dim)

    def forward(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(cond).chunk(self.n, dim=-1)


class MixFFN(nn.Module):
    """Gated FFN `silu(gate)·value` whose value half gets a depthwise conv over the image-token grid."""

    def __init__(self, dim: int, hidden: int, kernel: int = 3):
        super().__init__()
        self.fc_in = nn.Linear(dim, 2 * hidden)
        self.conv = depthwise_grid_conv(hidden, kernel)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        gate, value = self.fc_in(x).chunk(2, dim=-1)
        n_image = grid[0] * grid[1]
        image_value = grid_to_image(self.conv(image_to_grid(value[:, :n_image], grid)))
        value = torch.cat([image_value, value[:, n_image:]], dim=1)
        return self.fc_out(F.silu(gate) * value)


class MLP(nn.Module):
    """DiT's pointwise GELU feed-forward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc_in = nn.Linear(dim, hidden)
        self.fc_out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, grid: Grid) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate="tanh"))


class FourierFilter(nn.Module):
    """Global filter: image tokens x learned per-channel frequency response (FFT over the grid), zero-gated."""

    def __init__(self, dim: int, grid: Grid):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, grid[0], grid[1] // 2 + 1, 2) * 0.02)
        self.gate = nn.Parameter(torch.zeros(dim))

    def response(self, grid: Grid) -> torch.Tensor:
        """The complex filter (D, h, w//2+1), resampled when the grid differs from training."""
        weight = self.weight
        size = (grid[0], grid[1] // 2 + 1)
        if weight.shape[1:3] != size:
            weight = F.interpolate(weight.permute(0, 3, 1, 2).reshape(1, -1, *weight.shape[1:3]), size=size,
                                   mode="bilinear", align_corners=True)
            weight = weight.reshape(self.weight.shape[0], 2, *size).permute(0, 2, 3, 1)
        return torch.view_as_complex(weight.float().contiguous())

    def forward(self, image: torch.Tensor, grid: Grid) -> torch.Tensor:
        feature_map = image_to_grid(image, grid).float()
        spectrum = torch.fft.rfft2(feature_map, norm="ortho") * self.response(grid)
        filtered = torch.fft.irfft2(spectrum, s=grid, norm="ortho")
        return grid_to_image(filtered).to(image.dtype) * self.gate


class FinalLayer(nn.Module):
    """adaLN-modulated norm + linear to patch velocities; both zero-initialised so the model starts at v=0."""

    def __init__(self, cond_dim: int, dim: int, out_per_token: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.ada_ln = AdaLNHead(cond_dim, dim, 2)
        self.linear = nn.Linear(dim, out_per_token)

    def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada_ln(cond)
        return self.linear(modulate(self.norm(image), shift, scale))


class RepaProjector(nn.Module):
    """REPA's projector: image tokens -> the frozen encoder's feature space (a 3-layer SiLU MLP, as in SiT+REPA)."""

    def __init__(self, dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.mlp(image)  # (B, N, out_dim)


class SubPixelHead(nn.Module):
    """Hi-DiT's high-frequency pixel predictor: per-token pixel patches (a zero-initialised final layer), then
    PixelShuffle to the image grid."""

    def __init__(self, cond_dim: int, dim: int, pixel_patch: int, channels: int = 3):
        super().__init__()
        self.pixel_patch = pixel_patch
        self.final = FinalLayer(cond_dim, dim, pixel_patch * pixel_patch * channels)

    def forward(self, image: torch.Tensor, cond: torch.Tensor, grid: Grid) -> torch.Tensor:
        """Image tokens (B, h*w, D) -> pixel-space output (B, channels, h*p, w*p)."""
        out = self.final(image, cond)  # (B, h*w, p*p*channels)
        return F.pixel_shuffle(out.transpose(1, 2).reshape(image.shape[0], -1, *grid), self.pixel_patch)
