"""A small digit classifier over 8x8 ink, trained on held-out real digits, that scores generated digits.

It reads any image size that is a multiple of 8 (the image is area-averaged back to the 8x8 grid
of scikit-learn's digits), so it judges generated images at the resolution the digits were drawn at.
Its penultimate activations are the feature space of the `digits` FID/KID extractor.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INK_SIDE = 8
NUM_DIGITS = 10
CAPTION_DIGIT = re.compile(r"\bdigit (\d)\b")


def digit_of_caption(caption: str) -> int | None:
    """The digit a caption such as 'a handwritten digit 7' names, or None for other captions."""
    match = CAPTION_DIGIT.search(caption)
    return int(match.group(1)) if match else None


def images_to_ink(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1], dark ink on white -> (N, 64) ink in [0, 1] on the 8x8 grid."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[2] % INK_SIDE or images.shape[3] % INK_SIDE:
        raise ValueError(f"image size {tuple(images.shape[2:])} is not a multiple of {INK_SIDE}")
    grey = images.float().mean(dim=1, keepdim=True)
    return (1 - F.adaptive_avg_pool2d(grey, INK_SIDE)).flatten(1)


class DigitClassifier(nn.Module):
    """MLP on 8x8 ink: `features` gives the penultimate layer, `forward` the 10 digit logits."""

    def __init__(self, hidden: int = 128, feature_dim: int = 64):
        super().__init__()
        self.num_features = feature_dim  # read by torchmetrics' FID/KID for custom extractors
        self.body = nn.Sequential(nn.Linear(INK_SIDE * INK_SIDE, hidden), nn.ReLU(),
                                  nn.Linear(hidden, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, NUM_DIGITS)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] -> (N, feature_dim)."""
        return self.body(images_to_ink(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) predicted digits."""
        return self(images).argmax(dim=1)


def _shifted(ink: torch.Tensor) -> torch.Tensor:
    """The 8x8 ink and its one-pixel shifts in 4 directions (generated digits sit less exactly centred)."""
    grid = ink.view(-1, 1, INK_SIDE, INK_SIDE)
    padded = F.pad(grid, (1, 1, 1, 1))
    crops = [grid] + [padded[..., 1 + dy:1 + dy + INK_SIDE, 1 + dx:1 + dx + INK_SIDE]
                      for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
    return torch.cat(crops).flatten(1)


def fit_digit_classifier(images: torch.Tensor, labels: torch.Tensor | np.ndarray, *, epochs: int = 300,
                         lr: float = 1e-2, seed: int = 0) -> DigitClassifier:
    """Full-batch Adam on (N, 3, H, W) real digit images in [0, 1] and their labels; eval-mode result."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    missing = sorted(set(range(NUM_DIGITS)) - set(labels.tolist()))
    if missing:
        raise ValueError(f"the classifier needs examples of every digit; none of {missing}")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        classifier = DigitClassifier()
    ink = _shifted(images_to_ink(images))
    targets = labels.repeat(len(ink) // len(labels))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(ink), generator=generator)
        loss = F.cross_entropy(classifier.head(classifier.body(ink[order])), targets[order])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return classifier.eval().requires_grad_(False)


def digit_accuracy(classifier: DigitClassifier, images: torch.Tensor, digits: torch.Tensor | np.ndarray) -> float:
    """Fraction of images the classifier reads as the given digits."""
    digits = torch.as_tensor(digits, dtype=torch.long)
    return float((classifier.predict(images) == digits).float().mean())


def per_digit_accuracy(classifier: DigitClassifier, images: torch.Tensor,
                       digits: torch.Tensor | np.ndarray) -> dict[str, float]:
    """For each digit asked for, the fraction of its images read as it, keyed "0".."9" (JSON keys).

    The overall figure can hide one digit drawn as another (a 9 that reads as a 3), so the report keeps each.
    """
    digits = torch.as_tensor(digits, dtype=torch.long)
    correct = classifier.predict(images) == digits
    return {str(digit): float(correct[digits == digit].float().mean()) for digit in sorted(set(digits.tolist()))}
