"""A run in pictures: its periodic sample grids as one progress image (a row per step, a column per fixed prompt).

The sample grids are what `trainer/validation.SampleGrids` writes, `samples/step_NNNNNNN/NNNN_<prompt>.png` next to the
checkpoints: the same prompts from the same seeds at every step, so a column shows one image take shape.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont

from services import storage

SAMPLE_PATH = re.compile(r"/step_(\d{7})/(\d{4})_[^/]*\.png$")  # one image of one step's grid
MIN_TILE = 64  # pixels: small images are enlarged (nearest) to at least this side, so a 32 px digit stays legible
LABEL_WIDTH = 84
FONT_SIZE = 12
MARGIN = 4


def sample_rows(samples_uri: str) -> dict[int, list[Image.Image]]:
    """step -> its sample images in prompt order, for every step folder under `samples_uri`."""
    found: dict[int, dict[int, str]] = {}
    for uri in storage.list_uris(samples_uri, recursive=True):
        match = SAMPLE_PATH.search(uri)
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = uri
    return {step: [Image.open(io.BytesIO(storage.read_bytes(by_index[index]))).convert("RGB")
                   for index in sorted(by_index)]
            for step, by_index in sorted(found.items())}


def shared_words(prompts: Sequence[str]) -> tuple[str, list[str]]:
    """The words every prompt starts with, and what is left of each ("a handwritten digit", ["0", "1", ...])."""
    words = [prompt.split() for prompt in prompts]
    count = 0
    while len(prompts) > 1 and all(len(w) > count + 1 and w[count] == words[0][count] for w in words):
        count += 1
    return " ".join(words[0][:count]), [" ".join(w[count:]) for w in words]


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """`text`, cut with an ellipsis to fit `width` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def labelled_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], headers: Sequence[str], *, title: str = "",
                  notes: Sequence[Sequence[str]] | None = None, label_width: int = LABEL_WIDTH) -> Image.Image:
    """Image tiles on white: a label left of each row, a header over each column, an optional title line and a note
    under each tile (`notes[row][column]`). Small tiles are enlarged (nearest) to at least MIN_TILE pixels."""
    first = rows[0][1][0]
    scale = max(1, -(-MIN_TILE // min(first.size)))
    tile_w, tile_h = first.width * scale, first.height * scale
    columns = max(len(images) for _, images in rows)
    font = ImageFont.load_default(size=FONT_SIZE)
    line = FONT_SIZE + 2 * MARGIN
    header_h = (2 if title else 1) * line
    row_h = tile_h + MARGIN + (line if notes else 0)
    canvas = Image.new("RGB", (label_width + columns * (tile_w + MARGIN) + MARGIN, header_h + len(rows) * row_h + MARGIN),
                       "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((label_width, MARGIN), _fit(draw, title, canvas.width - label_width, font), fill="black", font=font)
    for column, header in enumerate(headers):
        centre = label_width + column * (tile_w + MARGIN) + tile_w / 2
        draw.text((centre, header_h - MARGIN), _fit(draw, header, tile_w, font), fill="black", font=font, anchor="md")
    for row, (label, images) in enumerate(rows):
        top = header_h + row * row_h
        draw.text((label_width - 2 * MARGIN, top + tile_h / 2), _fit(draw, label, label_width - 3 * MARGIN, font),
                  fill="black", font=font, anchor="rm")
        for column, image in enumerate(images):
            left = label_width + column * (tile_w + MARGIN)
            canvas.paste(image.resize((tile_w, tile_h), Image.Resampling.NEAREST), (left, top))
            if notes:
                draw.text((left + tile_w / 2, top + tile_h + MARGIN), _fit(draw, notes[row][column], tile_w, font),
                          fill="black", font=font, anchor="ma")
    return canvas


def progress_image(rows: dict[int, list[Image.Image]], prompts: Sequence[str]) -> Image.Image:
    """The sample grids as one image: a row per training step (oldest on top), a column per prompt."""
    if not rows:
        raise ValueError("no sample grids to assemble: the run wrote none yet (samples.prompts, samples.every_steps)")
    columns = max(len(images) for images in rows.values())
    shared, headers = shared_words(prompts[:columns])
    return labelled_grid([(f"step {step}", images) for step, images in rows.items()], headers,
                         title=f"prompts: {shared} …" if shared else "")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
