"""Hi-DiT's stage 2 pays (seed 004): the pixel branch lowers the pixel-space error against held-out images compared
with stage 1 alone trained for the same extra steps.

    python benchmarks/hidit_stages.py [--stage1-steps 1000] [--extra-steps 500]

On the digits that ship with scikit-learn as class folders at 64 px, encoded with the real tiny autoencoder taef2
(f8: 32x8x8 latents, lossy) and MiniLM captions, pixels stored beside the latents
(configs/encode/hidit-classfolder-taef2-pixels.yaml):
1. stage 1 (configs/train/hidit-stage1-tiny-cpu.yaml): HiDiT-tiny, latent flow only, for `--stage1-steps`;
2. from its checkpoint, two runs of `--extra-steps` more: stage 2 as its recipe is written
   (configs/train/hidit-stage2-tiny-cpu.yaml: the pixel branch on) and stage 1's recipe continued.
Each is scored on every held-out digit at noise levels below the pixel gate, where stage 2's pixel stream is
active: both streams noised to t with fixed noise, the model's clean image (stage 1: the codec's decoding of its
latent estimate `noisy - t * velocity`; stage 2: that plus its pixel stream's residual) compared with the
held-out image (MSE in [-1, 1], PSNR). The codec's own error (decoding the clean latent) is printed beside them:
the floor of every estimate that goes through the latent.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from benchmarks.digit_recipes import (  # noqa: E402
    RecipeRun,
    add_output_options,
    encode_digits,
    run_comparison,
    train_recipe,
)

STAGE1 = "configs/train/hidit-stage1-tiny-cpu.yaml"
STAGE2 = "configs/train/hidit-stage2-tiny-cpu.yaml"
T_GRID = (0.05, 0.1, 0.2)
CODEC_FLOOR = "codec"


def overrides(caches, checkpoints: Path, *, steps: int, batch_size: int, resume_from: Path | None) -> list[str]:
    return [f"data.uris=[{caches.train}]", f"batch_size={batch_size}", f"max_steps={steps}",
            f"checkpoint.uri={checkpoints}", f"checkpoint.every_steps={steps}",
            f"checkpoint.resume_from={resume_from if resume_from else 'null'}"]


@torch.no_grad()
def pixel_errors(export_uri: str, held_out: str, *, pixel_stream: bool, t_grid=T_GRID, batch: int = 120,
                 seed: int = 0) -> dict[str, float]:
    """Mean squared pixel error (in [-1, 1]) of the model's clean estimate at each t of `t_grid`, over every
    held-out sample, and the codec's own error under `CODEC_FLOOR`."""
    from services.cache.reader import collate, read_samples
    from trainer.data import index_shards
    from trainer.flow_matching import decoded_latent_estimate
    from trainer.generation import load_export
    from trainer.step import pixels_to_unit_range

    pipeline = load_export(export_uri, "cpu")
    model = pipeline.model.eval()
    samples = list(read_samples([entry.uri for entry in index_shards([held_out])]))
    sums = dict.fromkeys([*map(str, t_grid), CODEC_FLOOR], 0.0)
    for start in range(0, len(samples), batch):
        chunk = collate(samples[start:start + batch])
        x0, text, mask = chunk["latent"], chunk["text"], chunk["text_mask"]
        pixels = pixels_to_unit_range(chunk["pixels"])
        generator = torch.Generator().manual_seed(seed + start)
        noise, pixel_noise = torch.randn(x0.shape, generator=generator), torch.randn(pixels.shape, generator=generator)
        sums[CODEC_FLOOR] += _squared_error(pipeline.codec.decode(x0) * 2 - 1, pixels)
        for t in t_grid:
            times = torch.full((len(x0),), t)
            x_t, pixels_t = (1 - t) * x0 + t * noise, (1 - t) * pixels + t * pixel_noise
            if pixel_stream:
                out = model(x_t, times, text, mask, pixels=pixels_t)
                estimate = decoded_latent_estimate(x_t, times, out.velocity, pipeline.codec.decode) + out.pixel_residual
            else:
                estimate = decoded_latent_estimate(x_t, times, model(x_t, times, text, mask), pipeline.codec.decode)
            sums[str(t)] += _squared_error(estimate, pixels)
    return {key: total / len(samples) for key, total in sums.items()}


def _squared_error(estimate: torch.Tensor, pixels: torch.Tensor) -> float:
    """Sum over the batch of each image's mean squared error."""
    return float((estimate.float().clamp(-1, 1) - pixels).pow(2).flatten(1).mean(dim=1).sum())


def psnr(mse: float) -> float:
    return 10 * math.log10(4 / mse)  # the peak-to-peak range of [-1, 1] is 2


def compare(out: Path, *, stage1_steps: int, extra_steps: int, batch_size: int) -> dict:
    caches = encode_digits(out, "configs/encode/hidit-classfolder-taef2-pixels.yaml", class_folders=True, size=64)
    total = stage1_steps + extra_steps
    stage1 = train_recipe("stage 1", STAGE1, overrides(caches, out / "stage1", steps=stage1_steps,
                                                       batch_size=batch_size, resume_from=None))
    runs: list[tuple[RecipeRun, bool]] = [
        (train_recipe("stage 1 continued", STAGE1, overrides(caches, out / "stage1-continued", steps=total,
                                                             batch_size=batch_size, resume_from=out / "stage1")), False),
        (train_recipe("stage 2", STAGE2, overrides(caches, out / "stage2", steps=total, batch_size=batch_size,
                                                   resume_from=out / "stage1")), True),
    ]
    errors = {run.name: pixel_errors(run.checkpoints, caches.held_out, pixel_stream=pixel_stream)
              for run, pixel_stream in [(stage1, False), *runs]}
    print(f"held-out pixel MSE in [-1, 1] (PSNR dB) after {stage1_steps} steps of stage 1 and {extra_steps} more:")
    print(f"{'run':>18} " + " ".join(f"{'t=' + str(t):>16}" for t in T_GRID))
    for name, by_t in errors.items():
        print(f"{name:>18} " + " ".join(f"{by_t[str(t)]:>8.5f} ({psnr(by_t[str(t)]):4.1f})" for t in T_GRID))
    floor = errors["stage 1"][CODEC_FLOOR]
    print(f"the codec's own error (decoding the clean latent): {floor:.5f} ({psnr(floor):.1f} dB)")
    return {"stage1_steps": stage1_steps, "extra_steps": extra_steps, "t_grid": list(T_GRID), "pixel_mse": errors,
            "codec_mse": floor}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1-steps", type=int, default=1000)
    parser.add_argument("--extra-steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=32)
    add_output_options(parser)
    args = parser.parse_args(argv)
    return run_comparison(compare, args, "hidit-stages-", stage1_steps=args.stage1_steps,
                          extra_steps=args.extra_steps, batch_size=args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
