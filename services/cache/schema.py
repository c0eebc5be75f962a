"""One cached sample: its fields in memory and its files in a WebDataset shard."""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from services.cache.names import is_safe_stem

LatentDtype = Literal["fp16", "bf16"]
TextDtype = Literal["fp16", "int8"]

# Reserved meta.json entry recording how the arrays were stored (decoding reads the npy dtypes).
STORAGE_META_KEY = "storage"
_INT8_MAX = 127.0


class CacheFormatError(ValueError):
    """A cached sample whose files are missing, unreadable or inconsistent."""


@dataclass
class CacheSample:
    """An image latent and its caption's text-encoder states, as the train job consumes them."""

    key: str
    latent: np.ndarray  # (C, h, w) float32, already normalised by the codec's scale/shift
    text: np.ndarray  # (L, D) float32, real tokens only
    caption: str
    meta: dict[str, Any] = field(default_factory=dict)
    # (H, W, 3) uint8: the preprocessed image the latent was encoded from (Hi-DiT's pixel branch trains on it);
    # None when the cache was written without `output.store_pixels`.
    pixels: np.ndarray | None = None
    # (shard index in the reader's shard list, sample index within the shard); set by the reader.
    position: tuple[int, int] | None = None


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as .npy file bytes (no pickles)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=4096)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of an .npy header; cached because a cache repeats a few headers."""
    version = (header[6], header[7])
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    stream = io.BytesIO(header)
    np.lib.format.read_magic(stream)
    return read(stream)


def npy_view(data: bytes | memoryview, where: str) -> np.ndarray:
    """.npy file bytes -> a read-only array over the same memory, refusing pickles; `where` names the file."""
    try:
        if bytes(data[:6]) != _NPY_MAGIC:
            raise ValueError("no .npy magic string")
        version = (data[6], data[7])
        if version == (1, 0):
            end = 10 + int.from_bytes(data[8:10], "little")
        elif version in ((2, 0), (3, 0)):
            end = 12 + int.from_bytes(data[8:12], "little")
        else:
            raise ValueError(f"unknown .npy version {version}")
        shape, fortran_order, dtype = _npy_header(bytes(data[:end]))
        if dtype.hasobject:
            raise ValueError("it holds Python objects (a pickle)")
        count = math.prod(shape)
        if len(data) - end != count * dtype.itemsize:
            raise ValueError(f"{len(data) - end} data bytes for shape {shape} of {dtype}")
        flat = np.frombuffer(data, dtype=dtype, count=count, offset=end)
        return flat.reshape(shape[::-1]).transpose() if fortran_order else flat.reshape(shape)
    except Exception as exc:
        raise CacheFormatError(f"{where} is not a readable .npy array ({exc})") from exc


def _load_npy(raw: dict[str, Any], name: str) -> np.ndarray:
    return npy_view(raw[name], f"{_where(raw)}: {name}")


def _where(raw: dict[str, Any]) -> str:
    return f"sample {raw.get('__key__')!r} in {raw.get('__url__', '<memory>')}"


def float_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like torch's cast."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def quantize_text_int8(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: (L, D) float -> (L, D) int8 values and (L,) float32 absmax/127 scales."""
    text = np.asarray(text, dtype=np.float32)
    scales = np.abs(text).max(axis=-1) / _INT8_MAX if text.size else np.zeros(text.shape[0], np.float32)
    safe = np.where(scales > 0, scales, 1.0)[:, None]
    quantized = np.clip(np.rint(text / safe), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return quantized, scales.astype(np.float32)


def dequantize_text_int8(quantized: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of `quantize_text_int8`: (L, D) int8 and (L,) scales -> (L, D) float32."""
    if quantized.shape[:1] != scales.shape:
        raise CacheFormatError(
            f"text has {quantized.shape[0]} tokens but text_scale has shape {scales.shape}"
        )
    return quantized.astype(np.float32) * scales.astype(np.float32)[:, None]


def _to_fp16(values: np.ndarray, what: str, key: str) -> np.ndarray:
    with np.errstate(over="ignore"):  # overflow is reported below with the sample's key
        converted = np.asarray(values, dtype=np.float32).astype(np.float16)
    if not np.isfinite(converted).all():
        raise ValueError(
            f"sample {key!r}: {what} has values that are not finite in fp16 (|x| > 65504 or NaN)"
        )
    return converted


def encode_sample(sample: CacheSample, *, latent_dtype: LatentDtype, text_dtype: TextDtype) -> dict[str, Any]:
    """The WebDataset files of one sample: `latent.npy`, `text.npy` (+ `text_scale.npy`), caption, meta."""
    key = sample.key
    if not is_safe_stem(key):
        raise ValueError(
            f"sample key {key!r} may only hold [A-Za-z0-9_-] (WebDataset splits names at dots); "
            "pass the source id through services.cache.names.safe_stem"
        )
    if sample.latent.ndim != 3:
        raise ValueError(f"sample {key!r}: latent must be (C, h, w), got shape {sample.latent.shape}")
    if sample.text.ndim != 2:
        raise ValueError(f"sample {key!r}: text must be (L, D) real tokens, got shape {sample.text.shape}")
    if latent_dtype == "fp16":
        latent = _to_fp16(sample.latent, "latent", key)
    elif latent_dtype == "bf16":
        if not np.isfinite(sample.latent).all():
            raise ValueError(f"sample {key!r}: latent has NaN or infinite values")
        latent = float_to_bf16_bits(sample.latent)
    else:
        raise ValueError(f"latent_dtype {latent_dtype!r} is not one of 'fp16', 'bf16'")
    files: dict[str, Any] = {"__key__": key, "latent.npy": npy_bytes(latent)}
    if text_dtype == "fp16":
        files["text.npy"] = npy_bytes(_to_fp16(sample.text, "text", key))
    elif text_dtype == "int8":
        if not np.isfinite(sample.text).all():
            raise ValueError(f"sample {key!r}: text has NaN or infinite values")
        quantized, scales = quantize_text_int8(sample.text)
        files["text.npy"] = npy_bytes(quantized)
        files["text_scale.npy"] = npy_bytes(scales)
    else:
        raise ValueError(f"text_dtype {text_dtype!r} is not one of 'fp16', 'int8'")
    if sample.pixels is not None:
        if sample.pixels.dtype != np.uint8 or sample.pixels.ndim != 3 or sample.pixels.shape[-1] != 3:
            raise ValueError(f"sample {key!r}: pixels must be (H, W, 3) uint8, got {sample.pixels.dtype} "
                             f"{sample.pixels.shape}")
        files["pixels.npy"] = npy_bytes(sample.pixels)
    meta = {**sample.meta, STORAGE_META_KEY: {"latent": latent_dtype, "text": text_dtype}}
    files["caption.txt"] = sample.caption.encode("utf-8")
    files["meta.json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return files


def _decode_latent(raw: dict[str, Any], name: str) -> np.ndarray:
    stored = _load_npy(raw, name)
    # uint16 only ever holds bfloat16 bits: .npy has no bfloat16 dtype.
    latent = bf16_bits_to_float(stored) if stored.dtype == np.uint16 else stored.astype(np.float32)
    if latent.ndim == 4 and latent.shape[0] == 1:
        latent = latent[0]
    if latent.ndim != 3:
        raise CacheFormatError(f"{_where(raw)}: {name} must be (C, h, w), got shape {latent.shape}")
    return latent


def _decode_text(raw: dict[str, Any]) -> np.ndarray:
    stored = _load_npy(raw, "text.npy")
    if "text_scale.npy" in raw:
        text = dequantize_text_int8(stored, _load_npy(raw, "text_scale.npy"))
    elif stored.dtype == np.int8:
        raise CacheFormatError(f"{_where(raw)}: text.npy is int8 but text_scale.npy is missing")
    else:
        text = stored.astype(np.float32)
    if "text_mask.npy" in raw:
        # Reference layout: text padded to a fixed length; keep the tokens the mask marks real.
        mask = _load_npy(raw, "text_mask.npy").astype(bool).reshape(-1)
        text = text.reshape(-1, text.shape[-1])
        if mask.shape[0] != text.shape[0]:
            raise CacheFormatError(
                f"{_where(raw)}: text_mask has {mask.shape[0]} entries for {text.shape[0]} tokens"
            )
        text = text[mask]
    if text.ndim != 2:
        raise CacheFormatError(f"{_where(raw)}: text must be (L, D), got shape {text.shape}")
    return text


def _decode_pixels(raw: dict[str, Any]) -> np.ndarray | None:
    if "pixels.npy" not in raw:
        return None
    pixels = _load_npy(raw, "pixels.npy")
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise CacheFormatError(f"{_where(raw)}: pixels.npy must be (H, W, 3) uint8, got {pixels.dtype} {pixels.shape}")
    return pixels


def decode_sample(raw: dict[str, Any]) -> CacheSample:
    """A raw WebDataset sample (bytes or memoryview per file) -> `CacheSample`; also reads the reference layout."""
    latent_name = "latent.npy" if "latent.npy" in raw else "latents.npy"
    missing = [name for name in (latent_name, "text.npy", "caption.txt", "meta.json") if name not in raw]
    if missing:
        present = sorted(k for k in raw if not k.startswith("__"))
        raise CacheFormatError(
            f"{_where(raw)}: missing {', '.join(missing)} (has {', '.join(present) or 'nothing'})"
        )
    try:
        caption = bytes(raw["caption.txt"]).decode("utf-8")
        meta = json.loads(bytes(raw["meta.json"]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFormatError(
            f"{_where(raw)}: caption.txt or meta.json is not valid utf-8/JSON ({exc})"
        ) from exc
    if not isinstance(meta, dict):
        raise CacheFormatError(f"{_where(raw)}: meta.json must hold an object, got {type(meta).__name__}")
    return CacheSample(
        key=raw["__key__"],
        latent=_decode_latent(raw, latent_name),
        text=_decode_text(raw),
        caption=caption,
        meta=meta,
        pixels=_decode_pixels(raw),
    )
