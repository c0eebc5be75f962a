"""Real photos that ship inside installed packages (scikit-image, scikit-learn, matplotlib), with hand-written captions.

The one list of them: the demo corpus and the tests build their inputs from it, without a download.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    """A bundled photo with hand-written captions: the short one, the prompt and a long enhanced prompt."""

    name: str
    caption: str
    prompt: str
    enhanced_prompt: str


PHOTOS = (
    Photo(
        "astronaut",
        "Astronaut Eileen Collins in her flight suit",
        "portrait of an astronaut",
        "A formal portrait of a smiling astronaut in an orange and white flight suit covered in mission "
        "patches, standing in front of an American flag with a model space shuttle beside her, soft "
        "studio light.",
    ),
    Photo(
        "chelsea",
        "Chelsea the cat",
        "a tabby cat",
        "A close-up photo of an orange tabby cat with pale green eyes and long white whiskers, looking "
        "to the left, fur in sharp focus against a soft brown background.",
    ),
    Photo(
        "coffee",
        "a cup of coffee on a table",
        "a cup of coffee",
        "A top-down photo of a white ceramic cup of coffee with a milk foam pattern, resting on a "
        "saucer with a silver spoon, on a red wooden table in warm light.",
    ),
    Photo(
        "rocket",
        "a rocket on the launch pad",
        "a rocket ready for launch",
        "A tall white rocket standing on its launch pad beside the service tower, clear blue sky, long "
        "shadows of late afternoon, seen from a distance.",
    ),
    Photo(
        "china",
        "a temple in China",
        "a Chinese temple",
        "A traditional Chinese temple with curved tiled roofs and red pillars, framed by green trees "
        "under a bright sky, photographed from below.",
    ),
    Photo(
        "flower",
        "a flower in close-up",
        "a close-up of a flower",
        "A macro photo of a flower with delicate petals and a bright centre, shallow depth of field, "
        "the background blurred into soft green and pink.",
    ),
    Photo(
        "grace_hopper",
        "Rear Admiral Grace Hopper",
        "portrait of Grace Hopper",
        "A formal black-and-white style portrait of Grace Hopper in a dark naval uniform with medals, "
        "hat on, facing the camera against a plain backdrop.",
    ),
)
PHOTOS_BY_NAME = {photo.name: photo for photo in PHOTOS}


@functools.cache
def photo_pixels(name: str) -> np.ndarray:
    """The photo as an (H, W, 3) uint8 array."""
    import skimage.data

    if name in ("astronaut", "chelsea", "coffee", "rocket"):
        return getattr(skimage.data, name)()
    return np.array(Image.open(io.BytesIO(photo_jpeg(name))).convert("RGB"))


@functools.cache
def photo_jpeg(name: str) -> bytes:
    """The photo as JPEG bytes: the original file where the package ships one, else encoded at quality 90."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        path = next(p for p in load_sample_images().filenames if Path(p).stem == name)
        return Path(path).read_bytes()
    if name == "grace_hopper":
        from matplotlib import cbook

        with cbook.get_sample_data("grace_hopper.jpg") as handle:
            return handle.read()
    if name not in PHOTOS_BY_NAME:
        raise ValueError(f"unknown bundled photo {name!r}; known: {', '.join(PHOTOS_BY_NAME)}")
    buffer = io.BytesIO()
    Image.fromarray(photo_pixels(name)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_photo_folder(directory: str | Path, photos: tuple[Photo, ...] = PHOTOS) -> dict[str, str]:
    """`<name>.jpg` + `<name>.txt` (+ a `.json` for the first) per photo; returns key -> caption."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for index, photo in enumerate(photos):
        (directory / f"{photo.name}.jpg").write_bytes(photo_jpeg(photo.name))
        (directory / f"{photo.name}.txt").write_text(photo.caption + "\n", encoding="utf-8")
        if index == 0:
            (directory / f"{photo.name}.json").write_text('{"photographer": "NASA"}', encoding="utf-8")
    return {photo.name: photo.caption for photo in photos}
