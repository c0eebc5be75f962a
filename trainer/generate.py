"""Text-to-image from the command line: PNGs + grid.png + generation.json (the work is `trainer.generation`'s).

    python trainer/generate.py --checkpoint DIR|s3://... --prompt "a red fox" --out outputs/
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python trainer/generate.py` from anywhere
    sys.path.insert(0, str(REPO_ROOT))

from services import storage  # noqa: E402
from trainer.generation import generate_images, load_export, write_images  # noqa: E402
from trainer.samplers import SAMPLER_NAMES, SamplerSettings  # noqa: E402

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


def run(args: argparse.Namespace) -> list[str]:
    """Generate the prompts of parsed arguments and write them; returns the PNGs' paths (grid last)."""
    prompts = read_prompts(args)
    settings = SamplerSettings(steps=args.steps, cfg=args.cfg, guidance_low=args.guidance_low,
                               guidance_high=args.guidance_high, sampler=args.sampler,
                               sde_diffusion=args.sde_diffusion, pixel_stream=args.pixel_stream,
                               shift=args.shift, shift_base_tokens=args.shift_base_tokens, seed=args.seed,
                               batch_size=args.batch_size)
    pipeline = load_export(args.checkpoint, args.device)
    images = generate_images(pipeline, prompts, settings, args.size)
    paths = write_images(args.out, prompts, images)
    height, width = images.shape[2:]
    storage.write_json(storage.join(args.out, "generation.json"), {
        **settings.model_dump(), "checkpoint": str(args.checkpoint), "device": str(pipeline.device),
        "prompts": prompts, "size": [width, height]})
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="an export dir, a step_NNNNNNN dir or a checkpoint root (its newest verified step); "
                             "local or s3://")
    parser.add_argument("--prompt", action="append", help="a prompt; repeat for several")
    parser.add_argument("--prompts-file", help="one prompt per line")
    defaults = SamplerSettings()  # the library's defaults, the one place they are set
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--cfg", type=float, default=defaults.cfg, help="classifier-free guidance scale (1 = off)")
    parser.add_argument("--guidance-low", type=float, default=defaults.guidance_low,
                        help="CFG only for t in [guidance-low, guidance-high] (t=1 is noise)")
    parser.add_argument("--guidance-high", type=float, default=defaults.guidance_high)
    parser.add_argument("--sampler", choices=sorted(SAMPLER_NAMES), default=defaults.sampler,
                        help="an ODE solver, or sde (Euler-Maruyama on the flow's reverse SDE)")
    parser.add_argument("--sde-diffusion", type=float, default=defaults.sde_diffusion,
                        help="sde sampler: g(t)^2 = 2 x this x t")
    parser.add_argument("--pixel-stream", action="store_true",
                        help="Hi-DiT: integrate the pixel stream below the gate and output its pixels")
    parser.add_argument("--shift", type=float, default=defaults.shift, help="timestep shift of the sampling schedule")
    parser.add_argument("--shift-base-tokens", type=int, default=defaults.shift_base_tokens,
                        help="image tokens at which --shift holds; other sizes get shift*sqrt(tokens/base) (SD3)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--size", type=parse_size, help="pixels, N or WIDTHxHEIGHT (default: training size)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--out", required=True, help="output directory for PNGs, grid.png, generation.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from services.encoders import CodecError

    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except CodecError as exc:
        print(f"generate: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths) - 1} images and {paths[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
