"""Attention over the joint [image tokens, text tokens] sequence: ReLU linear, softmax, and cross."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Grid = tuple[int, int]


def relu_linear_attention(q, k, v, key_mask: torch.Tensor | None = None, eps: float = 1e-6) -> torch.Tensor:
    """`out = φ(q)(φ(k)ᵀv) / (φ(q)·Σφ(k) + eps)` with φ = ReLU, summed in fp32; q, k, v are (B, H, N, d)."""
    # The sums run over thousands of tokens: bf16/fp16 accumulation would lose the small terms.
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v = F.relu(q.float()), F.relu(k.float()), v.float()
        if key_mask is not None:
            k = k * key_mask[:, None, :, None]  # padding tokens contribute nothing to either sum
        kv = k.transpose(-2, -1) @ v  # (B, H, d, d)
        normaliser = q @ k.sum(dim=-2).unsqueeze(-1)  # (B, H, N, 1)
        return (q @ kv) / (normaliser + eps)


def rope_2d(grid: Grid, head_dim: int, device: torch.device, theta: float = 10000.0) -> torch.Tensor:
    """2-D rotary angles (N, head_dim/2): the first half of each head rotates with the row, the second with the column."""
    freqs = theta ** (-torch.arange(0, head_dim // 4, device=device, dtype=torch.float32) * 4 / head_dim)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], device=device, dtype=torch.float32),
        torch.arange(grid[1], device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.cat([rows.reshape(-1, 1) * freqs, cols.reshape(-1, 1) * freqs], dim=-1)


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs of the first N tokens of x (B, H, S, d) by angles (N, d/2); later tokens (text) stay put."""
    n = angles.shape[0]
    image, rest = x[:, :, :n].float(), x[:, :, n:]
    even, odd = image[..., 0::2], image[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([rotated.to(x.dtype), rest], dim=2)


def image_to_grid(tokens: torch.Tensor, grid: Grid) -> torch.Tensor:
    """(B, h*w, C) image tokens -> (B, C, h, w) feature map."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def grid_to_image(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) feature map -> (B, h*w, C) tokens."""
    return feature_map.flatten(2).transpose(1, 2)


def depthwise_grid_conv(channels: int, kernel: int) -> nn.Conv2d:
    """Depthwise conv over `image_to_grid` maps, with its weight stored channels-last like those maps.

    Autograd gives the weight's gradient the layout of the conv's (channels-last) input; a parameter laid out
    otherwise makes DDP warn "Grad strides do not match bucket view strides" on every backward.
    """
    conv = nn.Conv2d(channels, channels, kernel, padding=kernel // 2, groups=channels)
    # (C, 1, k, k) already counts as channels-last contiguous, so `.contiguous(...)` would keep its strides.
    conv.weight.data = torch.empty_like(conv.weight, memory_format=torch.channels_last).copy_(conv.weight.data)
    return conv


def keys_for_queries(key_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) padding mask -> SDPA boolean mask (B, 1, 1, S); a row with no real key may see all (its output is unused)."""
    if key_mask is None:
        return None
    empty = ~key_mask.any(dim=1, keepdim=True)
    return (key_mask | empty)[:, None, None, :]


class SelfAttention(nn.Module):
    """Per-block QKV projection and output projection around a token-mixing rule chosen by the subclass."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, key_mask=None, grid: Grid | None = None, rope: torch.Tensor | None = None):
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = self.mix(q, k, v, key_mask, grid)  # (B, H, S, d)
        return self.proj(out.transpose(1, 2).reshape(batch, seq, dim).to(x.dtype))

    def mix(self, q, k, v, key_mask, grid):
        raise NotImplementedError


class SoftmaxAttention(SelfAttention):
    """Full softmax attention (SDPA) over the joint sequence: the anchor blocks."""

    def mix(self, q, k, v, key_mask, grid):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keys_for_queries(key_mask))


class LinearAttention(SelfAttention):
    """ReLU linear attention; with `value_conv` > 0 a depthwise conv on V over image tokens adds locality (LiT)."""

    def __init__(self, dim: int, heads: int, value_conv: int = 0):
        super().__init__(dim, heads)
        self.value_conv = (
            depthwise_grid_conv(dim, value_conv) if value_conv else None
        )

    def mix(self, q, k, v, key_mask, grid):
        out = relu_linear_attention(q, k, v, key_mask)
        if self.value_conv is None:
            return out
        batch, heads, _, head_dim = v.shape
        n_image = grid[0] * grid[1]
        image_v = v[:, :, :n_image].transpose(1, 2).reshape(batch, n_image, heads * head_dim)
        local = grid_to_image(self.value_conv(image_to_grid(image_v, grid)))  # (B, N_img, D)
        local = local.reshape(batch, n_image, heads, head_dim).transpose(1, 2)
        return torch.cat([out[:, :, :n_image] + local, out[:, :, n_image:]], dim=2)


class CrossAttention(nn.Module):
    """Image tokens query the text tokens; the output projection starts at zero so the block starts as identity."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        batch, n_image, dim = image.shape
        head_dim = dim // self.heads
        q = self.q(self.norm(image)).reshape(batch, n_image, self.heads, head_dim).transpose(1, 2)
        k, v = self.kv(text).reshape(batch, text.shape[1], 2, self.heads, head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys_for_queries(text_mask))
        if text_mask is not None:
            # a caption with no real token (dropped for CFG and encoded as nothing) adds nothing
            out = out * text_mask.any(dim=1)[:, None, None, None]
        return self.proj(out.transpose(1, 2).reshape(batch, n_image, dim))
