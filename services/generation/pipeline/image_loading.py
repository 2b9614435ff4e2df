"""Stage 1: bytes in, an upright RGBA picture out (or a clear refusal).

Limits are checked on the header, before any pixel is decoded: the encoded
size, each side and the pixel count (params.MAX_IMAGE_*). PIL's own
decompression-bomb guard is global and only warns below twice its limit,
so it is not relied on; its hard error is turned into the same refusal.
Big pictures are reduced while decoding where the format allows it (JPEG
draft mode) and then capped at MAX_WORKING_SIDE, so later stages stay fast.
"""
from __future__ import annotations

import io
import math
import re
import struct
import zlib

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from services.common.errors import InvalidArgument
from services.generation.pipeline.params import (
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
)
from services.generation.pipeline.records import LoadedImage

SUPPORTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# Longest side kept after decoding; the square crop is at most 1024 pixels, so this leaves room
# for an object that fills only part of the picture.
MAX_WORKING_SIDE = 1536
MIN_IMAGE_SIDE = 8

# What a corrupt or truncated file makes PIL's decoders raise.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error, zlib.error)
# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def load_image(data: bytes) -> LoadedImage:
    if not data:
        raise InvalidArgument("image", "empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(
            "image", f"{_mib(len(data))} encoded, over the limit of {_mib(MAX_IMAGE_BYTES)}"
        )
    picture = _open(data)
    source_format = picture.format or "unknown"
    width, height = picture.size
    _check_size(width, height)

    try:
        orientation = picture.getexif().get(0x0112, 1)
    except _DECODE_ERRORS:
        orientation = 1  # unreadable EXIF: keep the picture as stored
    upright_size = (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)

    try:
        _draft(picture)
        picture.load()
        picture = _upright(picture)
        rgba = _to_rgba(picture)
    except Image.DecompressionBombError as error:
        raise _bomb(error) from error
    except _DECODE_ERRORS as error:
        raise InvalidArgument(
            "image", f"could not decode the {source_format} picture (the file is truncated or corrupt: {error})"
        ) from error

    rgba = _cap_side(rgba)
    alpha = rgba[..., 3]
    return LoadedImage(
        rgba=rgba,
        has_alpha=bool(alpha.min() < 255),
        source_format=source_format,
        size=upright_size,
    )


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _open(data: bytes) -> Image.Image:
    try:
        # Header only: nothing is decoded until load().
        return Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as error:
        raise _bomb(error) from error
    except UnidentifiedImageError as error:
        raise InvalidArgument(
            "image", "not a picture (could not identify the format; send PNG, JPEG, WebP, BMP, TIFF or GIF)"
        ) from error
    except _DECODE_ERRORS as error:
        raise InvalidArgument("image", f"could not read the picture's header (the file is corrupt: {error})") from error


def _check_size(width: int, height: int) -> None:
    if max(width, height) > MAX_IMAGE_SIDE:
        raise InvalidArgument(
            "image", f"{width}x{height} pixels is over the limit of {MAX_IMAGE_SIDE} pixels a side"
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidArgument(
            "image",
            f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is over the limit of "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels",
        )
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise InvalidArgument(
            "image", f"{width}x{height} pixels is too small (at least {MIN_IMAGE_SIDE} pixels a side)"
        )


def _bomb(error: Exception) -> InvalidArgument:
    """PIL's own guard fired (far over our limits): say so in our limits' terms."""
    claimed = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(claimed.group(1)) / 1e6:,.0f} megapixels" if claimed else "far too many pixels"
    return InvalidArgument(
        "image",
        f"the header claims {size}, over the limit of {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels and "
        f"{MAX_IMAGE_SIDE} pixels a side (refused before decoding, as a possible decompression bomb)",
    )


def _upright(picture: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(picture) or picture
    except _DECODE_ERRORS:
        return picture  # a damaged EXIF block should not cost the picture; keep it as stored


def _draft(picture: Image.Image) -> None:
    """JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far faster than decoding then shrinking."""
    width, height = picture.size
    if picture.format == "JPEG" and max(width, height) > MAX_WORKING_SIDE:
        # draft() keeps both sides at or above the request, so ask with the picture's own aspect.
        scale = MAX_WORKING_SIDE / max(width, height)
        picture.draft(picture.mode, (math.ceil(width * scale), math.ceil(height * scale)))


def _to_rgba(picture: Image.Image) -> np.ndarray:
    mode = picture.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit (or 32-bit integer) greyscale: PIL's convert("L") clips instead of scaling.
        values = np.asarray(picture, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or values.max() <= 65535 else float(values.max())
        grey = np.clip(values * (255.0 / peak) + 0.5, 0, 255).astype(np.uint8)
        return _grey_to_rgba(grey)
    if mode == "F":
        values = np.asarray(picture, dtype=np.float64)
        scale = 255.0 if values.max() <= 1.0 else 1.0
        grey = np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)
        return _grey_to_rgba(grey)
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        picture = picture.convert("RGB")
    if picture.mode != "RGBA":
        # P (with or without transparency), PA, LA, La, RGBa, RGBX, L, 1, RGB.
        picture = picture.convert("RGBA")
    return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8))


def _grey_to_rgba(grey: np.ndarray) -> np.ndarray:
    rgba = np.empty(grey.shape + (4,), np.uint8)
    rgba[..., :3] = grey[..., None]
    rgba[..., 3] = 255
    return rgba


def _cap_side(rgba: np.ndarray) -> np.ndarray:
    height, width = rgba.shape[:2]
    longest = max(height, width)
    if longest <= MAX_WORKING_SIDE:
        return rgba
    scale = MAX_WORKING_SIDE / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # Premultiplied (PIL resamples RGBA that way), so transparent pixels' colours do not bleed.
    return np.asarray(Image.fromarray(rgba, "RGBA").resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))
