"""Does the caption select the image? Regenerate each photo of a small photo run from its caption, against baselines.

    python -m trainer.evaluation.photo_recall --config configs/photos/recall.yaml \
        --set checkpoint=s3://hybriddit/photos/checkpoints --set reference_uri=s3://hybriddit/photos/cache

For every sample of the cache the model was trained on (decoded with the cache's codec: each photo as the model
saw it), three images are generated from the same noise: from its own caption, from another photo's caption (the
next one's) and from the empty prompt (unconditional). Each generated image is compared with every photo, by PSNR
in pixels and by RMSE in the codec's latent space (both images encoded: a distance in a learned feature space that
ships here). A model whose images come from its captions gives each photo back from its own caption (high PSNR,
its own photo nearest: recall@1 near 1, chance 1/N) and not from the others. `photos.json` (the numbers) and
`photos.png` (a row per photo: the photo, then each generated image with its PSNR to that photo) go next to the
checkpoint.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import torch
from pydantic import Field

from services.config import StrictModel
from trainer.samplers import SamplerSettings

logger = logging.getLogger("trainer.evaluation.photo_recall")

REPORT_FILE = "photos.json"
FIGURE_FILE = "photos.png"
MODES = ("caption", "wrong_caption", "unconditional")
HEADERS = {"caption": "own caption", "wrong_caption": "next caption", "unconditional": "no caption"}  # column heads


class PhotoRecallConfig(StrictModel):
    """One photo-recall run: the trained model, the cache it was trained on, how images are sampled."""

    checkpoint: str = Field(description="an export dir, a step_NNNNNNN dir or a checkpoint root (newest verified)")
    reference_uri: str = Field(description="the latent cache the model was trained on (manifest.json)")
    generation: SamplerSettings = SamplerSettings()
    device: str | None = Field(None, description="cpu, cuda ...; None = cuda if available")
    report_uri: str | None = Field(None, description=f"where the report goes; None = {REPORT_FILE} next to the "
                                                     "checkpoint (the figure goes beside it)")


def psnr_matrix(generated: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """(G, P) PSNR in dB of each generated image against each photo, both (N, 3, H, W) in [0, 1]."""
    mse = (generated[:, None].double() - photos[None].double()).pow(2).flatten(2).mean(dim=2)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def rmse_matrix(generated: torch.Tensor, photos: torch.Tensor) -> torch.Tensor:
    """(G, P) root-mean-square distance of each generated latent (or image) to each photo's."""
    return (generated[:, None].double() - photos[None].double()).pow(2).flatten(2).mean(dim=2).sqrt()


def wrong_captions(captions: list[str]) -> list[str]:
    """For each photo the next photo's caption (a cyclic shift): always another photo's, when captions differ."""
    return captions[1:] + captions[:1]


def recall_at_1(similarity: torch.Tensor) -> float:
    """Fraction of rows whose most similar column is their own (row i <-> column i)."""
    return float((similarity.argmax(dim=1) == torch.arange(len(similarity))).double().mean())


def compare(images: dict[str, torch.Tensor], photos: torch.Tensor, codec, device: torch.device
            ) -> dict[str, dict[str, Any]]:
    """Per mode: PSNR and latent RMSE of each generated image to its own photo, their means, recall@1 by both."""

    def latents(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return codec.encode(batch.to(device)).float().cpu()

    photo_latents = latents(photos)
    result = {}
    for mode, generated in images.items():
        psnr = psnr_matrix(generated, photos)
        rmse = rmse_matrix(latents(generated), photo_latents)
        result[mode] = {
            "psnr_to_own": psnr.diagonal().tolist(),
            "latent_rmse_to_own": rmse.diagonal().tolist(),
            "nearest_photo": psnr.argmax(dim=1).tolist(),
            "mean_psnr": float(psnr.diagonal().mean()),
            "mean_latent_rmse": float(rmse.diagonal().mean()),
            "recall_at_1_psnr": recall_at_1(psnr),
            "recall_at_1_latent": recall_at_1(-rmse),
        }
    return result


def figure(photos: torch.Tensor, images: dict[str, torch.Tensor], captions: list[str],
           scores: dict[str, dict[str, Any]]):
    """A row per photo: the photo, then the image of each mode with its PSNR to the photo."""
    from PIL import Image

    from trainer.evaluation.progress import labelled_grid
    from trainer.generation import to_uint8

    pictures = {name: [Image.fromarray(array) for array in to_uint8(batch)]
                for name, batch in {"photo": photos, **images}.items()}
    rows = [(caption, [pictures[name][index] for name in pictures]) for index, caption in enumerate(captions)]
    notes = [[""] + [f"{scores[mode]['psnr_to_own'][index]:.1f} dB" for mode in images]
             for index in range(len(captions))]
    return labelled_grid(rows, ["photo"] + [HEADERS[mode] for mode in images], notes=notes, label_width=240,
                         title="PSNR to the row's photo")


def photo_recall(config: PhotoRecallConfig) -> dict[str, Any]:
    """Generate every caption three ways, compare with the photos, write photos.json and photos.png; returns the
    report."""
    from services import storage
    from services.cache import manifest
    from trainer.checkpoint import resolve_export
    from trainer.evaluate import read_reference, sibling
    from trainer.evaluation.progress import png_bytes
    from trainer.generation import generate_images, load_export

    export_uri, report_dir = resolve_export(config.checkpoint)
    photos, captions = read_reference(config.reference_uri, manifest.read_manifest(config.reference_uri).num_samples)
    pipeline = load_export(export_uri, config.device)
    # every mode in one batch per call, so that photo i starts from the same noise in each
    settings = config.generation.model_copy(update={"batch_size": max(config.generation.batch_size, len(captions))})
    prompts = {"caption": captions, "wrong_caption": wrong_captions(captions), "unconditional": [""] * len(captions)}
    images = {mode: generate_images(pipeline, prompts[mode], settings, tuple(photos.shape[2:])) for mode in MODES}
    scores = compare(images, photos, pipeline.codec, pipeline.device)
    report_uri = config.report_uri or storage.join(report_dir, REPORT_FILE)
    figure_uri = sibling(report_uri, FIGURE_FILE)
    storage.write_bytes(figure_uri, png_bytes(figure(photos, images, captions, scores)))
    report = {
        "export": export_uri,
        "reference_uri": config.reference_uri,
        "captions": captions,
        "wrong_captions": prompts["wrong_caption"],
        "chance_recall_at_1": 1 / len(captions),
        "modes": scores,
        "figure": figure_uri,
        "config": config.model_dump(mode="json"),
    }
    storage.write_json(report_uri, report)
    report["report_uri"] = report_uri
    return report


def main(argv: list[str] | None = None) -> int:
    from services.config import job_config_from_command_line

    config = job_config_from_command_line(PhotoRecallConfig, argv, doc=__doc__,
                                          example_config="configs/photos/recall.yaml", example_override="device=cuda")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    report = photo_recall(config)
    summary = {mode: {key: scores[key] for key in ("mean_psnr", "mean_latent_rmse", "recall_at_1_psnr")}
               for mode, scores in report["modes"].items()}
    print("PHOTO_RECALL " + json.dumps({"report_uri": report["report_uri"], "figure": report["figure"],
                                        "chance_recall_at_1": report["chance_recall_at_1"], **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
