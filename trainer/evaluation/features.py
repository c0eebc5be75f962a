"""Image feature spaces for FID/KID: a name -> a module mapping (N, 3, H, W) images in [0, 1] to (N, d).

`inception` is the standard FID space (Inception-v3 pool features through torch-fidelity, whose weights
must be on disk); `digits` is the penultimate layer of a digit classifier fitted on the reference
images, the space in which a digit model is judged when no Inception weights can be had.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from services.config import StrictModel
from trainer.evaluation.digit_classifier import DigitClassifier, digit_of_caption, fit_digit_classifier


class FeatureExtractorError(RuntimeError):
    """A feature extractor that cannot be built here; the message says what to install or pass."""


class Features(nn.Module):
    """Images in [0, 1] -> (N, num_features) float features, for torchmetrics' custom `feature=` modules."""

    num_features: int


class DigitFeatures(Features):
    """The digit classifier's penultimate layer."""

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images)


class InceptionFeatures(Features):
    """Inception-v3 2048-d pool features as in FID (torch-fidelity's port of the TF graph)."""

    def __init__(self, weights_path: str | None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                                feature_extractor_weights_path=weights_path)
        except ModuleNotFoundError as exc:
            raise FeatureExtractorError(
                "features 'inception' needs torch-fidelity (pip install torch-fidelity) and its FID Inception "
                "weights (pt_inception-2015-12-05-6726825d.pth) on disk via feature_options.weights_path; "
                "or use features: digits"
            ) from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise FeatureExtractorError(
                f"features 'inception': cannot load the Inception weights ({weights_path or 'download'}): {exc}; "
                "pass feature_options.weights_path=<local pt_inception-2015-12-05-6726825d.pth>"
            ) from exc
        self.num_features = 2048

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inception((images.clamp(0, 1) * 255).to(torch.uint8)).float()


class DigitOptions(StrictModel):
    epochs: int = Field(300, ge=1, description="full-batch Adam epochs of the classifier")
    seed: int = 0


class InceptionOptions(StrictModel):
    weights_path: str | None = Field(None, description="local FID Inception weights; None = torch-fidelity's download")


def reference_digits(captions: list[str]) -> torch.Tensor:
    """The digit each reference caption names; every caption must name one."""
    digits = [digit_of_caption(caption) for caption in captions]
    unnamed = [caption for caption, digit in zip(captions, digits, strict=True) if digit is None]
    if unnamed:
        raise ValueError(f"features 'digits' needs captions naming a digit ('a handwritten digit N'); "
                         f"{len(unnamed)} reference captions do not, e.g. {unnamed[0]!r}")
    return torch.tensor(digits)


def build_digit_features(reference_images: torch.Tensor, reference_captions: list[str],
                         **options: Any) -> DigitFeatures:
    parsed = DigitOptions.model_validate(options)
    classifier = fit_digit_classifier(reference_images, reference_digits(reference_captions),
                                      epochs=parsed.epochs, seed=parsed.seed)
    return DigitFeatures(classifier)


def build_inception_features(reference_images: torch.Tensor, reference_captions: list[str],
                             **options: Any) -> InceptionFeatures:
    return InceptionFeatures(InceptionOptions.model_validate(options).weights_path)


FEATURE_EXTRACTORS: dict[str, Callable[..., Features]] = {
    "digits": build_digit_features,
    "inception": build_inception_features,
}


def build_features(name: str, reference_images: torch.Tensor, reference_captions: list[str],
                   **options: Any) -> Features:
    """The feature extractor `name`, fitted on the reference set where it learns from data."""
    if name not in FEATURE_EXTRACTORS:
        raise FeatureExtractorError(f"unknown features {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](reference_images, reference_captions, **options).eval()


class Precomputed(Features):
    """Identity over already extracted features, so FID/KID can run on features computed elsewhere (Ray)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
