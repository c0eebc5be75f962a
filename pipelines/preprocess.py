"""Per-sample preprocessing of the encode job: decode, orient, convert to RGB, bucket, resize, centre crop.

Everything here is a pure function of the sample's bytes and a `PreprocessConfig`, so the Ray graph,
plain Python loops and tests run the same code. A sample that cannot be used raises `SampleRejected`
with a short reason that the job counts (`decode_error`, `too_small`, ...), never a crash.
"""

from __future__ import annotations

import io
import math
import struct
import unicodedata
from dataclasses import dataclass

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from pydantic import Field, field_validator, model_validator

from services.config import StrictModel

# EXIF orientations 5-8 store the picture rotated by 90 degrees: width and height swap on display.
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}
# JPEG draft decoding and `reduce()` keep at least this many source pixels per output pixel, the
# margin Pillow's own thumbnail uses, so the final Lanczos filter still sees enough detail.
REDUCING_GAP = 2.0
WHITE = (255, 255, 255, 255)


class SampleRejected(Exception):
    """A sample the job drops; `reason` is the counter it increments, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PreprocessConfig(StrictModel):
    """How images become codec inputs: one square size, or equal-area aspect-ratio buckets."""

    resolution: int = Field(default=512, gt=0, description="side of the square centre crop without buckets")
    buckets: list[tuple[int, int]] | None = Field(
        default=None, description="(width, height) sizes of about equal area; the nearest aspect ratio wins"
    )
    min_size: int = Field(default=64, gt=0, description="shorter side below this is rejected as too_small")
    max_pixels: int = Field(default=64_000_000, gt=0, description="larger headers are decompression bombs")
    multiple_of: int = Field(
        default=32, gt=0, description="the codec's downscale factor; sizes must divide by it"
    )
    image_formats: list[str] = Field(
        default_factory=lambda: ["JPEG", "PNG", "WEBP"], min_length=1,
        description="the only Pillow decoders run on input bytes (others are unsupported_format); every extra "
        "format is more parser exposed to outside files",
    )

    @field_validator("image_formats")
    @classmethod
    def _known_to_pillow(cls, formats: list[str]) -> list[str]:
        Image.init()
        unknown = [name for name in formats if name not in Image.OPEN]
        if unknown:
            raise ValueError(f"image_formats {unknown} are not Pillow formats (it reads {sorted(Image.OPEN)})")
        return formats

    @model_validator(mode="after")
    def _sizes_fit_the_codec(self) -> PreprocessConfig:
        if self.resolution % self.multiple_of:
            raise ValueError(
                f"resolution {self.resolution} is not a multiple of multiple_of={self.multiple_of}"
            )
        if self.buckets is not None:
            if not self.buckets:
                raise ValueError("buckets is empty: give at least one (width, height) or leave it unset")
            for width, height in self.buckets:
                if width <= 0 or height <= 0 or width % self.multiple_of or height % self.multiple_of:
                    raise ValueError(
                        f"bucket ({width}, {height}): sizes must be positive multiples of {self.multiple_of}"
                    )
        return self

    def bucket_sizes(self) -> list[tuple[int, int]]:
        return list(self.buckets) if self.buckets is not None else [(self.resolution, self.resolution)]


@dataclass
class PreparedImage:
    """Codec-ready pixels plus where they came from (sizes are width, height of the upright image)."""

    pixels: np.ndarray  # (H, W, 3) uint8
    original_size: tuple[int, int]
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in original_size coordinates
    bucket: tuple[int, int]


def clean_caption(text_or_bytes: str | bytes | None) -> str:
    """A caption as one line of NFC text; undecodable or empty captions are rejected."""
    if text_or_bytes is None:
        raise SampleRejected("missing_caption", "no caption")
    if isinstance(text_or_bytes, bytes):
        try:
            text = text_or_bytes.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SampleRejected(
                "bad_caption_encoding", f"not UTF-8 ({exc.reason} at byte {exc.start})"
            ) from None
    else:
        text = text_or_bytes
    text = " ".join(unicodedata.normalize("NFC", text).split())
    if not text:
        raise SampleRejected("missing_caption", "caption is empty or whitespace")
    return text


def choose_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest in log space (2:1 and 1:2 are equally far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda bucket: abs(math.log(bucket[0] / bucket[1]) - aspect))


def centre_crop_box(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The largest centred box of the bucket's aspect ratio inside a width x height image."""
    bucket_width, bucket_height = bucket
    if width * bucket_height > height * bucket_width:  # wider than the bucket: trim left and right
        crop_width = min(width, max(1, round(height * bucket_width / bucket_height)))
        left = (width - crop_width) // 2
        return left, 0, left + crop_width, height
    crop_height = min(height, max(1, round(width * bucket_height / bucket_width)))
    top = (height - crop_height) // 2
    return 0, top, width, top + crop_height


def _open_header(image_bytes: bytes, config: PreprocessConfig) -> Image.Image:
    """Parse only the header and refuse sizes that are bombs or too small before any pixel is decoded."""
    if not image_bytes:
        raise SampleRejected("empty_file", "zero bytes")
    try:
        image = Image.open(io.BytesIO(image_bytes), formats=config.image_formats)
    except UnidentifiedImageError as exc:
        sniffed = _sniffed_format(image_bytes)
        if sniffed is not None and sniffed not in config.image_formats:
            raise SampleRejected(
                "unsupported_format", f"a {sniffed} file; image_formats={config.image_formats}"
            ) from None
        raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    except Image.DecompressionBombError as exc:
        raise SampleRejected("decompression_bomb", str(exc)) from None
    except (OSError, SyntaxError, ValueError, struct.error) as exc:
        raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width * height > config.max_pixels:
        raise SampleRejected(
            "decompression_bomb", f"header claims {width}x{height} > max_pixels={config.max_pixels}"
        )
    if min(width, height) < config.min_size:
        raise SampleRejected("too_small", f"{width}x{height}, shorter side < min_size={config.min_size}")
    return image


def _sniffed_format(image_bytes: bytes) -> str | None:
    """The format whose signature the bytes start with, found by Pillow's prefix checks alone (no decoder runs)."""
    Image.init()
    prefix = image_bytes[:16]
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            matched = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - a signature check that trips on odd bytes just does not match
            continue
        if matched and not isinstance(matched, str):  # a str is Pillow's "recognised but unreadable" note
            return name
    return None


def _upright_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, struct.error):
        orientation = 1  # unreadable EXIF: show the pixels as stored rather than drop the photo
    return (height, width) if orientation in TRANSPOSING_ORIENTATIONS else (width, height)


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float32)
    # Mode "I" also holds 8-bit data widened to 32 bits; only values above 255 show a 16-bit range.
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited on white, 16-bit grey is rescaled."""
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def _request_draft(image: Image.Image, upright_size: tuple[int, int], config: PreprocessConfig) -> None:
    """Let JPEG decode at 1/2, 1/4 or 1/8 scale when the output needs far fewer pixels (no-op otherwise)."""
    bucket = choose_bucket(*upright_size, config.bucket_sizes())
    left, _, right, _ = centre_crop_box(*upright_size, bucket)
    scale = bucket[0] / (right - left)
    width, height = image.size
    image.draft(None, (math.ceil(width * scale * REDUCING_GAP), math.ceil(height * scale * REDUCING_GAP)))


def _decode_upright_rgb(image: Image.Image) -> Image.Image:
    try:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as exc:
        raise SampleRejected("decompression_bomb", str(exc)) from None
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "decode_error"
        raise SampleRejected(reason, f"{type(exc).__name__}: {exc}") from None
    except (SyntaxError, ValueError, TypeError, EOFError, struct.error) as exc:
        raise SampleRejected("decode_error", f"{type(exc).__name__}: {exc}") from None


def prepare_image(image_bytes: bytes, config: PreprocessConfig) -> PreparedImage:
    """Decode one image and return its bucket-sized centre crop; raises SampleRejected with a reason."""
    image = _open_header(image_bytes, config)
    is_jpeg = image.format == "JPEG"
    header_upright_size = _upright_size(image)
    _request_draft(image, header_upright_size, config)
    decoded = _decode_upright_rgb(image)
    # A JPEG's EXIF sits in its header, so the header size is the true one even after a draft decode;
    # other formats decode at full size and may carry EXIF after the pixels (PNG eXIf).
    upright_width, upright_height = header_upright_size if is_jpeg else decoded.size
    bucket = choose_bucket(upright_width, upright_height, config.bucket_sizes())
    crop_box = centre_crop_box(upright_width, upright_height, bucket)
    x_scale, y_scale = decoded.width / upright_width, decoded.height / upright_height
    decoded_box = (crop_box[0] * x_scale, crop_box[1] * y_scale, crop_box[2] * x_scale, crop_box[3] * y_scale)
    resized = decoded.resize(bucket, Image.Resampling.LANCZOS, box=decoded_box, reducing_gap=REDUCING_GAP)
    return PreparedImage(
        pixels=np.array(resized, dtype=np.uint8),
        original_size=(upright_width, upright_height),
        crop_box=crop_box,
        bucket=bucket,
    )
