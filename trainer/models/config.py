"""Every hyper-parameter of the DiT family in one validated config, and the named presets."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from services.config import StrictModel


class DiTConfig(StrictModel):
    """One config covers the hybrid DiT and its variants; the defaults are the 148.5M reference model."""

    latent_channels: int = Field(32, ge=1)
    latent_size: int = Field(16, ge=1, description="training latent side; other sizes work at run time")
    patch_size: int = Field(1, ge=1)
    text_dim: int = Field(768, ge=1)
    text_len: int = Field(384, ge=1, description="max text tokens the model was trained with")
    dim: int = Field(768, ge=8)
    heads: int = Field(12, ge=1)
    depth: int = Field(12, ge=1)
    full_attention_blocks: list[int] = Field(
        default_factory=lambda: [2, 5, 8, 11],
        description="blocks with softmax attention; the rest use ReLU linear attention",
    )
    cross_attention: bool = Field(True, description="zero-initialised image->text softmax cross-attention")
    cross_attention_in: Literal["full", "all"] = Field(
        "full", description="blocks with the cross-attention: the softmax anchors (hybrid), or every block, "
        "linear ones included (PixArt-style text-to-image, where text reaches the image only through it)")
    text_drop_block: int | None = Field(None, ge=0, description="token funnel: from this block on, image only")
    linear_heads: int | None = Field(None, ge=1, description="heads of linear attention (LiT: few); None = heads")
    linear_value_conv: int = Field(0, ge=0, description="depthwise conv kernel on V in linear attention; 0 = off")
    ffn: Literal["mix", "mlp"] = "mix"
    mlp_ratio: float = Field(4.0, gt=0)
    ffn_conv: int = Field(3, ge=1, description="Mix-FFN depthwise conv kernel on image tokens")
    trunk_dim: int | None = Field(384, ge=1, description="shared conditioning trunk width; None = AdaLN-Zero")
    position: Literal["none", "learned", "rope2d"] = "none"
    refiner_depth: int = Field(0, ge=0, description="image-only and text-only refiner blocks before fusion")
    fourier_filter: bool = Field(False, description="zero-gated global Fourier filter on image tokens per block")
    # Hi-DiT (seed 004): a pixel stream through the same trunk. t=1 is noise (trainer/flow_matching.py), so the
    # low-noise regime where pixel tokens are injected is t < pixel_gate_t.
    pixel_stream: bool = Field(False, description="Hi-DiT: time-gated pixel-token embedding + sub-pixel pixel head")
    pixel_factor: int = Field(8, ge=1, description="image pixels per latent pixel (the codec's downsampling)")
    pixel_gate_t: float = Field(0.3, ge=0, le=1, description="pixel tokens are added only for t < this")
    # REPA (used by Hi-DiT's recipe): an MLP projects the image tokens after `repa_depth` blocks to a frozen image
    # encoder's features (trainer/representation.py), aligned by the train job's `repa` loss.
    repa_depth: int | None = Field(None, ge=1, description="REPA projector after this many blocks; None = no REPA")
    repa_dim: int = Field(384, ge=1, description="the frozen encoder's feature width (DINOv2-small: 384)")
    repa_hidden: int = Field(2048, ge=1, description="hidden width of the REPA projector MLP")

    @model_validator(mode="after")
    def _check_shapes(self) -> DiTConfig:
        for name, heads in (("heads", self.heads), ("linear_heads", self.linear_heads or self.heads)):
            if self.dim % heads:
                raise ValueError(f"dim={self.dim} is not divisible by {name}={heads}")
        if self.position == "rope2d" and (self.dim // self.heads) % 4:
            raise ValueError(f"rope2d needs head dim divisible by 4, got {self.dim // self.heads}")
        bad = [b for b in self.full_attention_blocks if not 0 <= b < self.depth]
        if bad:
            raise ValueError(f"full_attention_blocks {bad} are outside 0..{self.depth - 1}")
        if self.text_drop_block is not None and self.text_drop_block > self.depth:
            raise ValueError(f"text_drop_block={self.text_drop_block} is beyond depth={self.depth}")
        if self.repa_depth is not None and self.repa_depth > self.depth:
            raise ValueError(f"repa_depth={self.repa_depth} is beyond depth={self.depth}")
        if self.pixel_stream and self.refiner_depth:
            raise ValueError("pixel_stream adds pixel tokens to the trunk's image tokens; refiner_depth must be 0")
        if self.latent_size % self.patch_size:
            raise ValueError(f"latent_size={self.latent_size} is not divisible by patch_size={self.patch_size}")
        return self

    def is_full_attention(self, block: int) -> bool:
        return block in self.full_attention_blocks

    def has_cross_attention(self, block: int) -> bool:
        return self.cross_attention and (self.cross_attention_in == "all" or self.is_full_attention(block))

    @property
    def pixel_patch(self) -> int:
        """Side of the pixel patch behind one image token."""
        return self.pixel_factor * self.patch_size


_REFERENCE = DiTConfig()

# Joint full-attention DiT with AdaLN-Zero and learned positions (seed 001), DiT-B/2 widths on SD-VAE latents.
_JOINT = DiTConfig(
    latent_channels=4, latent_size=32, patch_size=2, text_dim=768, text_len=128,
    full_attention_blocks=list(range(12)), cross_attention=False, ffn="mlp", trunk_dim=None, position="learned",
)
# LiT (seed 003): the joint DiT with every attention ReLU-linear, 2 heads and a depthwise conv on V,
# so that it inherits every non-attention weight of a trained joint DiT.
_LIT = _JOINT.model_copy(update={"full_attention_blocks": [], "linear_heads": 2, "linear_value_conv": 5})
# PixArt-style text-to-image DiT, the teacher LiT's text-to-image model is converted from (seed 003): softmax
# self-attention over image tokens only (text_drop_block=0) and softmax cross-attention to the text in every block.
_CROSS = _JOINT.model_copy(update={"text_drop_block": 0, "cross_attention": True, "cross_attention_in": "all",
                                   "text_len": 300})
# LiT text-to-image (seed 003): the same with every self-attention ReLU-linear; the cross-attention stays softmax.
_LIT_T2I = _CROSS.model_copy(update={"full_attention_blocks": [], "linear_heads": 2, "linear_value_conv": 5})
# Single-stream DiT (seed 002): FLUX-VAE latents, T5Gemma text, 2-D RoPE, refiners, Fourier filters.
_SINGLE_STREAM = DiTConfig(
    latent_channels=16, latent_size=32, patch_size=2, text_dim=1152, text_len=128, depth=16,
    full_attention_blocks=list(range(16)), cross_attention=False, mlp_ratio=8 / 3, trunk_dim=None,
    position="rope2d", refiner_depth=2, fourier_filter=True,
)

# Hi-DiT (seed 004): the joint DiT-B/2 (the seed's SiT is a plain DiT) with a time-gated pixel stream on f8 latents.
_HIDIT = _JOINT.model_copy(update={"pixel_stream": True, "pixel_factor": 8})

_TINY = {"dim": 64, "heads": 4, "depth": 4, "text_dim": 32, "text_len": 16, "latent_size": 8}


def _tiny(config: DiTConfig, **extra) -> DiTConfig:
    """Same architecture at test size (64 wide, 4 deep, 32-d text, 8x8 latents)."""
    update = {**_TINY, **extra}
    if config.trunk_dim is not None:
        update["trunk_dim"] = 32
    return DiTConfig.model_validate({**config.model_dump(), **update})


MODEL_PRESETS: dict[str, DiTConfig] = {
    "HybridDiT-148M": _REFERENCE,
    "JointDiT-B/2": _JOINT,
    "LiT-B/2": _LIT,
    "CrossDiT-B/2": _CROSS,
    "LiT-T2I-B/2": _LIT_T2I,
    "SingleStreamDiT-B/2": _SINGLE_STREAM,
    "HybridDiT-tiny": _tiny(_REFERENCE, latent_channels=4, full_attention_blocks=[1, 3]),
    "JointDiT-tiny": _tiny(_JOINT, full_attention_blocks=[0, 1, 2, 3]),
    "LiT-tiny": _tiny(_LIT),
    "CrossDiT-tiny": _tiny(_CROSS, full_attention_blocks=[0, 1, 2, 3]),
    "LiT-T2I-tiny": _tiny(_LIT_T2I),
    "HiDiT-B/2": _HIDIT,
    "HiDiT-tiny": _tiny(_HIDIT, full_attention_blocks=[0, 1, 2, 3]),
    "SingleStreamDiT-tiny": _tiny(_SINGLE_STREAM, latent_channels=4, full_attention_blocks=[0, 1, 2, 3], refiner_depth=1),
}
DEFAULT_PRESET = "HybridDiT-148M"


def resolve_config(preset_or_config: str | DiTConfig | dict) -> DiTConfig:
    """A preset name, a config, or a config dict (e.g. from `model_config.json`) -> validated config."""
    if isinstance(preset_or_config, DiTConfig):
        return preset_or_config
    if isinstance(preset_or_config, dict):
        return DiTConfig.model_validate(preset_or_config)
    if preset_or_config not in MODEL_PRESETS:
        raise KeyError(f"unknown model preset {preset_or_config!r}; known: {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[preset_or_config].model_copy(deep=True)
