"""Hub locations and architectures of the diffusers autoencoders: the published one and a tiny one each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.encoders.hub import HubModel

DC_AE_STAGES = (
    "ResBlock",
    "ResBlock",
    "ResBlock",
    "EfficientViTBlock",
    "EfficientViTBlock",
    "EfficientViTBlock",
)
KL_DOWN_BLOCKS = ("DownEncoderBlock2D",) * 4
KL_UP_BLOCKS = ("UpDecoderBlock2D",) * 4


@dataclass(frozen=True)
class DiffusersAutoencoder:
    """One published autoencoder: diffusers class, hub location, full and tiny architecture."""

    model_class: str  # "AutoencoderDC" or "AutoencoderKL"
    hub: HubModel
    subfolder: str | None
    full_config: dict[str, Any]
    tiny_config: dict[str, Any]


# The architecture diffusers' DC-AE conversion script builds for the f32c32 Sana checkpoints (312M params).
DC_AE_F32C32 = {
    "latent_channels": 32,
    "encoder_block_types": DC_AE_STAGES,
    "decoder_block_types": DC_AE_STAGES,
    "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3),
    "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}
# Same six stages (so the same 32x downscale and 32 channels) at a width that encodes in ~0.1 s.
DC_AE_TINY = {
    **DC_AE_F32C32,
    "attention_head_dim": 8,
    "encoder_block_out_channels": (8, 8, 16, 16, 32, 32),
    "decoder_block_out_channels": (8, 8, 16, 16, 32, 32),
    "encoder_layers_per_block": (1, 1, 1, 1, 1, 1),
    "decoder_layers_per_block": (1, 1, 1, 1, 1, 1),
}

KL_F8 = {
    "down_block_types": KL_DOWN_BLOCKS,
    "up_block_types": KL_UP_BLOCKS,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "norm_num_groups": 32,
}
KL_F8_TINY = {**KL_F8, "block_out_channels": (8, 16, 16, 16), "layers_per_block": 1, "norm_num_groups": 4}
# FLUX.1's VAE: 16 channels, no quant convs, latents shifted as well as scaled (values from its config.json).
FLUX1_VAE = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
             "scaling_factor": 0.3611, "shift_factor": 0.1159}  # fmt: skip
SD_VAE = {"latent_channels": 4, "scaling_factor": 0.18215}

# Revisions: a commit only where one was found recorded for that repository in public code (sd-vae-ft-mse:
# the same hash in two unrelated projects); the others have none verified yet, so a load pins the commit their
# default branch points at when the job starts, unless `revision=<commit>` is given (services/encoders/hub.py).
DIFFUSERS_AUTOENCODERS = {
    "dc-ae-f32c32-sana-1.1": DiffusersAutoencoder(
        "AutoencoderDC",
        HubModel("mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", revision=None),
        None,
        DC_AE_F32C32,
        DC_AE_TINY,
    ),
    "flux1-vae": DiffusersAutoencoder(
        "AutoencoderKL",
        HubModel("black-forest-labs/FLUX.1-dev", revision=None),
        "vae",
        {**KL_F8, **FLUX1_VAE},
        {**KL_F8_TINY, **FLUX1_VAE},
    ),
    "sd-vae": DiffusersAutoencoder(
        "AutoencoderKL",
        HubModel("stabilityai/sd-vae-ft-mse", revision="31f26fdeee1355a5c34592e401dd41e45d25a493"),
        None,
        {**KL_F8, **SD_VAE},
        {**KL_F8_TINY, **SD_VAE},
    ),
}
