"""A corpus of hostile pictures, made on the fly."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from tests.images import encode, photo, photo_jpeg, photo_png


def _png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims width×height over a few bytes of data: a decompression bomb's shape."""
    raw = encode(np.zeros((1, 1, 3), np.uint8), "PNG")
    ihdr_at = raw.index(b"IHDR")
    fields = struct.pack(">II", width, height) + raw[ihdr_at + 12 : ihdr_at + 17]
    chunk = b"IHDR" + fields
    patched = raw[: ihdr_at - 4] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return patched + raw[ihdr_at + 4 + 13 + 4 :]


def _real_bomb() -> bytes:
    """A small file that really decodes to a gigapixel: zeros compress ~1000:1."""
    width = height = 30_000
    row = b"\0" + b"\0" * width
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(200)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def bad_pictures() -> dict[str, bytes]:
    """Pictures that must be refused with INVALID_ARGUMENT naming `image`."""
    white = np.full((256, 256, 3), 255, np.uint8)
    transparent = np.zeros((256, 256, 4), np.uint8)
    return {
        "text": b"hello, I am not a picture",
        "random-bytes": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated-png": photo_png()[:300],
        "truncated-jpeg": photo_jpeg()[: len(photo_jpeg()) // 3],
        "png-header-only": b"\x89PNG\r\n\x1a\n",
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        "claims-100000x100000": _png_with_size(100_000, 100_000),
        "zero-pixels": _png_with_size(0, 0),
        "one-pixel": encode(np.full((1, 1, 3), 128, np.uint8), "PNG"),
        "100000-pixels-wide": encode(Image.new("L", (100_000, 1), 0), "PNG"),
        "gigapixel-bomb": _real_bomb(),
        "fully-transparent": encode(transparent, "PNG"),
        "plain-white": encode(white, "PNG"),
        "plain-white-jpeg": encode(white, "JPEG"),
        "utf8-junk": "💥ȸ̷̡̛̭̪͚͈̩̟̤͚̼̫̞ᚠᛇᚻ\u202e\x00".encode(),
    }


def tricky_but_valid_pictures() -> dict[str, bytes]:
    """Odd encodings of a real photo: each must still make a mesh."""
    rgb = photo("chelsea", 256)[..., :3]
    frames = [Image.fromarray(rgb), Image.fromarray(rgb[::-1].copy())]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    sixteen = photo("coffee", 256)[..., 0].astype(np.uint16) * 257  # PIL saves uint16 as a 16-bit PNG
    logo = Image.fromarray(photo("logo", 256))  # RGBA with a real alpha mask
    return {
        "animated-gif": gif.getvalue(),
        "16-bit-png": encode(Image.fromarray(sixteen), "PNG"),
        "cmyk-jpeg": encode(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "palette-with-transparency": encode(logo.convert("P", palette=Image.Palette.ADAPTIVE).convert("RGBA").quantize(64), "PNG", transparency=0),
    }
