"""The demo corpus: scikit-learn's handwritten digits, upscaled and captioned, plus bundled photos.

Every input ships inside installed packages (scikit-learn, scikit-image, matplotlib), so the demo and
the end-to-end tests build a small real dataset without a download. Digits are split once, by index,
into a training folder and a held-out folder that no training job sees: the held-out digits train the
digit classifier that scores generated images and serve as the FID/KID reference.

    python -m pipelines.demo.corpus --out out/demo/corpus
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.demo.photos import PHOTOS, photo_pixels

DIGIT_SIZE = 32  # pixels per side of a written digit image (the 8x8 originals upscaled 4x)
DIGIT_LEVELS = 16  # load_digits() stores ink as 0..16
HELD_OUT_EVERY = 5  # every 5th digit (by dataset index) is held out: 360 of 1797
TRAIN_DIR, HELD_OUT_DIR = "train", "heldout"


def digit_caption(digit: int) -> str:
    """The prompt a digit image is captioned with and generated from."""
    return f"a handwritten digit {digit}"


@dataclass(frozen=True)
class Digits:
    """load_digits() split by index: ink in [0, 1] as (N, 8, 8) float32 and labels (N,)."""

    train_ink: np.ndarray
    train_labels: np.ndarray
    held_out_ink: np.ndarray
    held_out_labels: np.ndarray


def load_digit_split() -> Digits:
    """The 1797 scikit-learn digits, every HELD_OUT_EVERY-th one held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = (digits.images / DIGIT_LEVELS).astype(np.float32)
    held_out = np.arange(len(ink)) % HELD_OUT_EVERY == 0
    return Digits(ink[~held_out], digits.target[~held_out], ink[held_out], digits.target[held_out])


def ink_to_image(ink: np.ndarray, size: int = DIGIT_SIZE) -> Image.Image:
    """(8, 8) ink in [0, 1] -> a size x size RGB image of dark ink on white paper (bicubic upscale)."""
    grey = Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), "L")
    return grey.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def _write_pair(directory: Path, stem: str, image: Image.Image, caption: str) -> None:
    image.save(directory / f"{stem}.png")
    (directory / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")


def write_digit_folder(directory: Path, ink: np.ndarray, labels: np.ndarray, size: int = DIGIT_SIZE) -> int:
    """`digit-NNNNN-L.png` + `.txt` per digit; returns how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, (digit_ink, label) in enumerate(zip(ink, labels, strict=True)):
        _write_pair(directory, f"digit-{index:05d}-{label}", ink_to_image(digit_ink, size), digit_caption(int(label)))
    return len(ink)


def write_digit_class_folders(directory: Path, ink: np.ndarray, labels: np.ndarray, size: int = DIGIT_SIZE) -> int:
    """ImageNet-style `<digit>/digit-NNNNN.png` for the classfolder source (the label is the folder, no captions);
    returns how many were written."""
    for index, (digit_ink, label) in enumerate(zip(ink, labels, strict=True)):
        (directory / str(label)).mkdir(parents=True, exist_ok=True)
        ink_to_image(digit_ink, size).save(directory / str(label) / f"digit-{index:05d}.png")
    return len(ink)


def build_demo_corpus(out: str | Path, *, photos: bool = True, digits: tuple[int, ...] = tuple(range(10)),
                      limit_per_digit: int | None = None, size: int = DIGIT_SIZE,
                      class_folders: bool = False) -> dict[str, object]:
    """Write `<out>/train` (digits + photos) and `<out>/heldout` (every held-out digit); returns a summary.

    `digits` and `limit_per_digit` (the first N of each class) make smaller training folders. `class_folders`
    writes the digits as class folders instead (the class-conditional layout of Hi-DiT's ImageNet recipe), without
    photos.
    """
    if class_folders and photos:
        raise ValueError("class_folders holds digits only: set photos=False")
    write = write_digit_class_folders if class_folders else write_digit_folder
    out = Path(out)
    split = load_digit_split()
    keep = np.concatenate([np.flatnonzero(split.train_labels == d)[:limit_per_digit] for d in digits])
    keep.sort()
    train_ink, train_labels = split.train_ink[keep], split.train_labels[keep]
    train = write(out / TRAIN_DIR, train_ink, train_labels, size)
    held_out = write(out / HELD_OUT_DIR, split.held_out_ink, split.held_out_labels, size)
    if photos:
        for photo in PHOTOS:
            _write_pair(out / TRAIN_DIR, f"photo-{photo.name}", Image.fromarray(photo_pixels(photo.name)), photo.caption)
    summary = {"root": str(out), "train_digits": train, "held_out_digits": held_out,
               "photos": len(PHOTOS) if photos else 0, "image_size": size}
    (out / "corpus.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to write train/ and heldout/ into")
    parser.add_argument("--no-photos", action="store_true", help="digits only")
    parser.add_argument("--limit-per-digit", type=int, help="at most N training digits per class")
    parser.add_argument("--class-folders", action="store_true",
                        help="digits only, as <digit>/*.png class folders (for the classfolder source)")
    parser.add_argument("--size", type=int, default=DIGIT_SIZE, help="image side in pixels")
    args = parser.parse_args(argv)
    summary = build_demo_corpus(args.out, photos=not (args.no_photos or args.class_folders),
                                limit_per_digit=args.limit_per_digit, size=args.size,
                                class_folders=args.class_folders)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
