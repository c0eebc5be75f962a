"""The evaluation job: FID, KID, CLIP score and digit accuracy of a checkpoint against held-out cache samples.

    ray job submit -- python trainer/evaluate.py --config configs/demo/evaluate.yaml \
        --set checkpoint=s3://hybriddit/demo/checkpoints --set reference_uri=s3://hybriddit/demo/cache-heldout

Reads N held-out samples of a latent cache (decoded with the cache's codec: the reference images) and
generates `images_per_caption` images per reference caption (each from its own noise) with
`trainer/generate.py` (in this process, or split into Ray tasks for large N). FID/KID compare the two sets in a pluggable feature space (`trainer/evaluation/features.py`);
CLIP score needs local CLIP weights; with `features: digits` the digit classifier fitted on the
reference also reports how often a generated image shows the digit its prompt asked for. The report
is written as `eval.json` next to the checkpoint.

With a `sweep` (lists of CFG scales, samplers and step counts; configs/demo/sweep.yaml) every combination
generates the same prompts from the same seeds and is scored the same way: `sweep.json` (one row per
setting) and `sweep.png` (each metric against CFG scale, one line per sampler and step count) go next to
`eval.json`, whose metrics stay those of `generation`. Without one, `generation` is a sweep of one.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from itertools import product
from pathlib import Path
from typing import Annotated, Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python trainer/evaluate.py` under `ray job submit`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from pydantic import Field  # noqa: E402

from services.config import StrictModel  # noqa: E402
from trainer.samplers import SamplerSettings  # noqa: E402

logger = logging.getLogger("trainer.evaluate")

REPORT_FILE = "eval.json"
SWEEP_FILE = "sweep.json"
SWEEP_PLOT = "sweep.png"
# One velocity per step for Euler, two for Heun, four for RK4 (trainer/samplers.py); CFG doubles each.
VELOCITIES_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}


class GenerationSettings(SamplerSettings):
    """How the evaluated images are sampled, and where."""

    cfg: float = Field(3.0, ge=0, description="classifier-free guidance scale (1 = off)")
    batch_size: int = Field(50, ge=1, description="prompts generated together")
    device: str | None = Field(None, description="cpu, cuda ...; None = cuda if available")


class RaySettings(StrictModel):
    """Generation split over Ray tasks; off = one process generates everything."""

    enabled: bool = False
    tasks: int = Field(2, ge=1, description="prompt chunks generated in parallel")
    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)


class SweepSettings(StrictModel):
    """Sampling settings crossed with each other; each combination generates the same prompts from the same seeds."""

    cfg: list[Annotated[float, Field(ge=0)]] = Field(min_length=1, description="CFG scales (1 = off)")
    samplers: list[Literal["euler", "heun", "rk4"]] = Field(min_length=1)
    steps: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)


class EvalConfig(StrictModel):
    """One evaluation of one checkpoint."""

    checkpoint: str = Field(description="an export dir (model_config.json), a step_NNNNNNN dir or a checkpoint "
                                        "root (its newest step whose export verifies); local path or s3://")
    reference_uri: str = Field(description="held-out latent cache root (manifest.json) never trained on")
    num_samples: int = Field(500, ge=2, description="N reference samples, whose captions are the prompts")
    images_per_caption: int = Field(1, ge=1, description="images generated per reference caption, each from its own "
                                    "noise: more images per digit make a per-digit accuracy a finer measure")
    features: Literal["digits", "inception"] = "inception"
    feature_options: dict[str, Any] = Field(default_factory=dict)
    kid_subset_size: int = Field(100, ge=2, description="KID subset size (capped at N)")
    kid_subsets: int = Field(100, ge=1)
    clip_model: str | None = Field(None, description="CLIP hub id or local dir for CLIP score; None = skipped")
    generation: GenerationSettings = GenerationSettings()
    sweep: SweepSettings | None = Field(None, description="settings scored besides `generation` (sweep.json/.png)")
    ray: RaySettings = RaySettings()
    report_uri: str | None = Field(None, description=f"where the report goes; None = {REPORT_FILE} next to the "
                                                     "checkpoint")


# --------------------------------------------------------------------------- inputs


def read_reference(cache_uri: str, num_samples: int) -> tuple[torch.Tensor, list[str]]:
    """The first N samples of a cache decoded to (N, 3, H, W) images in [0, 1], and their captions."""
    from services.cache import manifest, reader
    from services.encoders import build_codec

    card = manifest.read_manifest(cache_uri)
    codec = build_codec(**card.codec)
    latents, captions = [], []
    for sample in reader.read_samples(manifest.shard_uris(cache_uri)):
        latents.append(torch.from_numpy(sample.latent.astype(np.float32)))
        captions.append(sample.caption)
        if len(captions) == num_samples:
            break
    if len(captions) < num_samples:
        raise ValueError(f"reference cache {cache_uri} holds {len(captions)} samples, fewer than "
                         f"num_samples={num_samples}: lower num_samples or encode more held-out images")
    shapes = {tuple(latent.shape) for latent in latents}
    if len(shapes) > 1:
        raise ValueError(f"reference cache {cache_uri} mixes latent shapes {sorted(shapes)}; FID needs one size")
    return codec.decode(torch.stack(latents)), captions


def generate_chunk(export_uri: str, prompts: list[str], settings: GenerationSettings, seed: int,
                   height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) uint8 images for the prompts, batch k seeded `seed + its first prompt's index`."""
    from trainer.generation import generate_images as generate
    from trainer.generation import load_export, to_uint8

    pipeline = load_export(export_uri, settings.device)
    return to_uint8(generate(pipeline, prompts, settings.model_copy(update={"seed": seed}), (height, width)))


def generate_all(settings: GenerationSettings, ray_settings: RaySettings, export_uri: str, prompts: list[str],
                 height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) generated images in [0, 1]; chunk k is seeded from its first prompt's index either way."""
    chunk = settings.batch_size * max(1, -(-len(prompts) // (settings.batch_size * ray_settings.tasks)))
    starts = range(0, len(prompts), chunk if ray_settings.enabled else len(prompts))
    arguments = [(export_uri, prompts[start:start + chunk if ray_settings.enabled else None], settings,
                  settings.seed + start, height, width) for start in starts]
    if ray_settings.enabled:
        import ray

        if not ray.is_initialized():
            ray.init()  # the cluster from RAY_ADDRESS (set by `ray job submit`), else a local one
        task = ray.remote(generate_chunk).options(num_cpus=ray_settings.num_cpus, num_gpus=ray_settings.num_gpus)
        chunks = ray.get([task.remote(*args) for args in arguments])
    else:
        chunks = [generate_chunk(*args) for args in arguments]
    return torch.from_numpy(np.concatenate(chunks)).permute(0, 3, 1, 2).float() / 255


def sweep_settings(config: EvalConfig) -> list[GenerationSettings]:
    """`generation` first (the headline of eval.json), then each combination of the sweep that differs from it."""
    settings = [config.generation]
    if config.sweep is not None:
        for sampler, steps, cfg in product(config.sweep.samplers, config.sweep.steps, config.sweep.cfg):
            candidate = config.generation.model_copy(update={"sampler": sampler, "steps": steps, "cfg": cfg})
            if candidate not in settings:
                settings.append(candidate)
    return settings


def velocities_per_image(settings: GenerationSettings) -> int:
    """Model evaluations one image costs: steps x the solver's stages, x2 with CFG (scale 1 runs one branch)."""
    return settings.steps * VELOCITIES_PER_STEP[settings.sampler] * (1 if settings.cfg == 1.0 else 2)


# --------------------------------------------------------------------------- metrics


def batched(module: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([module(images[i:i + batch]) for i in range(0, len(images), batch)])


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, kid_subset_size: int,
                         kid_subsets: int) -> dict[str, float]:
    """FID and KID (mean, std) between two (N, d) feature sets, computed by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from trainer.evaluation.features import Precomputed

    identity = Precomputed(real.shape[1])
    fid = FrechetInceptionDistance(feature=identity, normalize=True)
    with warnings.catch_warnings():  # "KID keeps every feature in memory": it gets nothing else here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=identity, subsets=kid_subsets,
                                      subset_size=min(kid_subset_size, len(real), len(fake)), normalize=True)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def clip_score(model: str, images: torch.Tensor, prompts: list[str], batch: int = 64) -> float:
    """Mean CLIP score (100 x cosine, floored at 0) of images against their prompts."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    try:
        metric = CLIPScore(model_name_or_path=model)
    except (OSError, ValueError) as exc:
        raise FileNotFoundError(f"clip_model {model!r} cannot be loaded ({exc}); pass a local directory with a "
                                "transformers CLIP checkpoint, or clip_model: null to skip CLIP score") from exc
    for start in range(0, len(images), batch):
        metric.update((images[start:start + batch] * 255).to(torch.uint8), prompts[start:start + batch])
    return float(metric.compute())


def score(config: EvalConfig, features: torch.nn.Module, reference_features: torch.Tensor, generated: torch.Tensor,
          prompts: list[str], digits: torch.Tensor | None) -> dict[str, Any]:
    """The metrics of one set of generated images: FID/KID, digit accuracy (when `digits`), CLIP score."""
    from trainer.evaluation.digit_classifier import digit_accuracy, per_digit_accuracy

    metrics: dict[str, Any] = distribution_metrics(reference_features, batched(features, generated),
                                                   config.kid_subset_size, config.kid_subsets)
    if digits is not None:
        metrics["digit_accuracy"] = digit_accuracy(features.classifier, generated, digits)
        metrics["digit_accuracy_per_digit"] = per_digit_accuracy(features.classifier, generated, digits)
    metrics["clip_score"] = clip_score(config.clip_model, generated, prompts) if config.clip_model else None
    return metrics


def sibling(uri: str, name: str) -> str:
    """`name` in the folder of `uri` (local or s3://)."""
    head, separator, _ = uri.rpartition("/")
    return head + separator + name


def write_sweep(config: EvalConfig, rows: list[dict[str, Any]], export_uri: str, report_uri: str) -> dict[str, str]:
    """sweep.json (the table) and sweep.png (each metric against CFG scale) next to the report; returns their URIs."""
    from services import storage
    from trainer.evaluation.plots import sweep_figure

    uris = {"table": sibling(report_uri, SWEEP_FILE), "plot": sibling(report_uri, SWEEP_PLOT)}
    storage.write_json(uris["table"], {"export": export_uri, "reference_uri": config.reference_uri,
                                       "num_samples": config.num_samples,
                                       "images_per_caption": config.images_per_caption, "features": config.features,
                                       "seed": config.generation.seed, "rows": rows})
    space = "digit classifier" if config.features == "digits" else config.features
    panels = [("fid", f"FID ({space} features, lower is better)")]
    if config.features == "digits":
        panels.insert(0, ("digit_accuracy", "digit accuracy (read as the prompted digit)"))
    if config.clip_model:
        panels.append(("clip_score", "CLIP score"))
    chosen = config.generation
    storage.write_bytes(uris["plot"], sweep_figure(
        rows, panels, chosen={"sampler": chosen.sampler, "steps": chosen.steps, "cfg": chosen.cfg},
        title=f"{config.num_samples * config.images_per_caption} images per setting, the same seeds for each"))
    return uris


def evaluate(config: EvalConfig) -> dict[str, Any]:
    """Run the evaluation (every setting of the sweep) and write the report; returns it."""
    from services import storage
    from trainer.checkpoint import resolve_export
    from trainer.evaluation.digit_classifier import digit_accuracy
    from trainer.evaluation.features import DigitFeatures, build_features, reference_digits

    started = time.perf_counter()
    export_uri, report_dir = resolve_export(config.checkpoint)  # the newest step that verifies, as resume takes
    reference, captions = read_reference(config.reference_uri, config.num_samples)
    height, width = reference.shape[2:]
    features = build_features(config.features, reference, captions, **config.feature_options)
    reference_features = batched(features, reference)
    prompts = captions * config.images_per_caption
    digits = reference_digits(prompts) if isinstance(features, DigitFeatures) else None
    rows = []
    for settings in sweep_settings(config):
        began = time.perf_counter()
        generated = generate_all(settings, config.ray, export_uri, prompts, height, width)
        seconds = time.perf_counter() - began
        metrics = score(config, features, reference_features, generated, prompts, digits)
        rows.append({"sampler": settings.sampler, "steps": settings.steps, "cfg": settings.cfg,
                     "velocities_per_image": velocities_per_image(settings), "generate_seconds": seconds,
                     "metrics": metrics})
        logger.info("%s, %d steps, cfg %g: %s", settings.sampler, settings.steps, settings.cfg, json.dumps(metrics))
    metrics = dict(rows[0]["metrics"])  # `generation`'s
    if digits is not None:
        metrics["images_per_digit"] = {str(d): int((digits == d).sum()) for d in sorted(set(digits.tolist()))}
        metrics["digit_accuracy_reference"] = digit_accuracy(features.classifier, reference, reference_digits(captions))
    report_uri = config.report_uri or storage.join(report_dir, REPORT_FILE)
    report = {
        "checkpoint": config.checkpoint,
        "export": export_uri,
        "reference_uri": config.reference_uri,
        "num_samples": config.num_samples,
        "generated_images": len(prompts),
        "features": config.features,
        "image_size": [int(width), int(height)],
        "metrics": metrics,
        "sweep": write_sweep(config, rows, export_uri, report_uri) if config.sweep is not None else None,
        "seconds": {"generate": rows[0]["generate_seconds"], "total": time.perf_counter() - started},
        "config": config.model_dump(mode="json"),
    }
    storage.write_json(report_uri, report)
    report["report_uri"] = report_uri
    logger.info("wrote %s: %s", report_uri, json.dumps(metrics))
    return report


def main(argv: list[str] | None = None) -> int:
    from services.config import job_config_from_command_line

    config = job_config_from_command_line(EvalConfig, argv, doc=__doc__, example_config="configs/demo/evaluate.yaml",
                                          example_override="num_samples=100")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = evaluate(config)
    print("EVAL_REPORT " + json.dumps({"report_uri": report["report_uri"], "sweep": report["sweep"], **report["metrics"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
