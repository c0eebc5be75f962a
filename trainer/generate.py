"""Text-to-image with an exported model: encode prompts, integrate the flow with CFG, decode, write PNGs + grid.

    python trainer/generate.py --checkpoint DIR|s3://... --prompt "a red fox" --out outputs/
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence

from trainer.samplers import SAMPLERS, classifier_free_guidance, sample, text_velocity

logger = logging.getLogger(__name__)


def parse_size(text: str) -> tuple[int, int]:
    """`512` or `768x512` (width x height) -> (height, width) in pixels."""
    match = re.fullmatch(r"(\d+)(?:x(\d+))?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"--size {text!r} is not N or WIDTHxHEIGHT, e.g. 512 or 768x512")
    width = int(match.group(1))
    return int(match.group(2) or width), width


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("generate: give at least one --prompt or a non-empty --prompts-file")
    return prompts


def pad_captions(embeddings: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-token embeddings [(L_i, D)] -> padded (B, L, D) and mask (B, L), True = real token."""
    lengths = torch.tensor([len(e) for e in embeddings])
    text = pad_sequence(embeddings, batch_first=True)
    if text.shape[1] == 0:  # every caption empty: keep one (masked) slot so shapes stay valid
        text = text.new_zeros(len(embeddings), 1, text.shape[2])
    mask = torch.arange(text.shape[1])[None, :] < lengths[:, None]
    return text.to(device), mask.to(device)


def file_stem(index: int, prompt: str) -> str:
    return f"{index:04d}_{re.sub(r'[^A-Za-z0-9]+', '-', prompt).strip('-')[:48] or 'empty'}"


def image_grid(images: list):
    """A near-square grid of the images, the last row filled up with black tiles."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    blank = Image.new("RGB", images[0].size)
    return make_image_grid(images + [blank] * (rows * cols - len(images)), rows=rows, cols=cols)


def generate(args: argparse.Namespace) -> list[Path]:
    """Run the whole pipeline for parsed arguments; returns the PNG paths (grid last)."""
    from diffusers.image_processor import VaeImageProcessor

    from services.encoders import CodecError, build_codec, build_text_encoder
    from trainer.export import load_exported_model

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, exported = load_exported_model(args.checkpoint, device)
    codec = build_codec(**{**exported.codec, "device": device})
    if not codec.spec.has_decoder:
        raise CodecError(f"checkpoint {args.checkpoint} was trained on codec {codec.spec.name!r}, which has no "
                         f"decoder; {codec.decoder_alternative or 'retrain or export with a codec that decodes'}")
    text_encoder = build_text_encoder(**{**exported.text_encoder, "device": device})
    if text_encoder.spec.dim != model.config.text_dim:
        raise ValueError(f"text encoder {text_encoder.spec.name!r} gives {text_encoder.spec.dim}-d tokens, "
                         f"the model at {args.checkpoint} expects {model.config.text_dim}")
    height, width = args.size or (model.config.latent_size * codec.spec.downscale,) * 2
    factor = codec.spec.downscale * model.config.patch_size
    if height % factor or width % factor:
        raise ValueError(f"--size {width}x{height} must be a multiple of {factor} (codec downscale x patch size)")
    shape = (model.config.latent_channels, height // codec.spec.downscale, width // codec.spec.downscale)

    prompts = read_prompts(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    null_text, null_mask = pad_captions(text_encoder.encode([""]), device)
    # bf16 autocast on CUDA; the CPU path stays fp32 (bf16 matmuls are far slower there)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    paths, images = [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        text, mask = pad_captions(text_encoder.encode(batch), device)
        unconditional = text_velocity(model, null_text.expand(len(batch), -1, -1), null_mask.expand(len(batch), -1))
        velocity = classifier_free_guidance(text_velocity(model, text, mask), unconditional, args.cfg)
        with torch.no_grad(), autocast:
            latents = sample(velocity, (len(batch), *shape), sampler=args.sampler, steps=args.steps,
                             shift=args.shift, seed=args.seed + start, device=device)
        decoded = VaeImageProcessor.pt_to_numpy(codec.decode(latents.float()))  # [0, 1], (B, H, W, 3)
        for offset, image in enumerate(VaeImageProcessor.numpy_to_pil(decoded)):
            path = out / f"{file_stem(start + offset, batch[offset])}.png"
            image.save(path)
            paths.append(path)
            images.append(image)
        logger.info("generated %d/%d images", len(paths), len(prompts))
    grid = image_grid(images)
    grid.save(out / "grid.png")
    settings = {key: value for key, value in vars(args).items() if key != "prompts_file"}
    (out / "generation.json").write_text(json.dumps({**settings, "checkpoint": str(args.checkpoint),
                                                     "prompts": prompts, "size": [width, height]}, indent=2))
    return [*paths, out / "grid.png"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export dir or s3:// prefix with model.safetensors")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    parser.add_argument("--prompts-file", help="one prompt per line")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=3.5, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--sampler", choices=sorted(SAMPLERS), default="heun")
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift of the sampling schedule")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=parse_size, help="pixels, N or WIDTHxHEIGHT (default: training size)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output directory for PNGs, grid.png, generation.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from services.encoders import CodecError

    args = build_parser().parse_args(argv)
    try:
        paths = generate(args)
    except CodecError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
