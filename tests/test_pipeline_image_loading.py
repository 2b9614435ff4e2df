"""image_loading: every supported encoding decodes upright to RGBA uint8; bad bytes are refused clearly."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image
from skimage import data as samples

from services.common.errors import InvalidArgument
from services.generation.pipeline import image_loading
from services.generation.pipeline.image_loading import MAX_WORKING_SIDE, load_image
from services.generation.pipeline.params import MAX_IMAGE_BYTES


def encode(image: Image.Image | np.ndarray, fmt: str, **options: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def raw_png(pixels: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB)."""
    height, width = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    rows = b"".join(b"\0" + pixels[row].astype(dtype).tobytes() for row in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows))
            + png_chunk(b"IEND", b""))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG header over almost no data."""
    return raw_png(np.zeros((1, 1), np.uint8), 8, 0).replace(
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)),
        png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)),
    )


def marker_picture(width: int = 60, height: int = 40) -> np.ndarray:
    """Grey picture with a red block in its top-left corner, to follow orientation."""
    picture = np.full((height, width, 3), 90, np.uint8)
    picture[:10, :15] = (255, 0, 0)
    return picture


ASTRONAUT = samples.astronaut()


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_each_format_decodes_to_rgba(fmt: str) -> None:
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    loaded = load_image(encode(ASTRONAUT, fmt, **options))
    assert loaded.source_format == fmt
    assert loaded.rgba.dtype == np.uint8 and loaded.rgba.shape == (512, 512, 4)
    assert loaded.size == (512, 512)
    assert not loaded.has_alpha
    tolerance = 40 if fmt == "GIF" else 12  # GIF is palettised
    assert np.abs(loaded.rgba[..., :3].astype(int) - ASTRONAUT).mean() < tolerance


def test_jpeg_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    loaded = load_image(encode(marker_picture(), "JPEG", quality=95, exif=exif))
    assert loaded.rgba.shape[:2] == (60, 40)  # width and height swapped
    assert loaded.size == (40, 60)
    # The stored top-left corner lands top-right after a clockwise turn.
    assert loaded.rgba[3, -5, 0] > 200 and loaded.rgba[3, -5, 1] < 60
    assert loaded.rgba[-3, 3, 0] < 150


def test_animated_gif_gives_its_first_frame() -> None:
    first = np.zeros((32, 32, 3), np.uint8)
    first[:, :16] = (250, 10, 10)
    second = np.full((32, 32, 3), (10, 10, 250), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(first).save(buffer, "GIF", save_all=True, append_images=[Image.fromarray(second)], duration=50)
    loaded = load_image(buffer.getvalue())
    assert loaded.rgba[5, 5, 0] > 200 and loaded.rgba[5, 5, 2] < 50
    assert loaded.rgba[5, 25, :3].max() < 50


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
    loaded = load_image(raw_png(ramp, 16, 0))
    grey = loaded.rgba[0, :, 0].astype(int)
    assert grey[0] == 0 and grey[-1] == 255
    assert abs(grey[32] - round(ramp[0, 32] / 257)) <= 1
    assert np.all(np.diff(grey) >= 0)


def test_sixteen_bit_rgb_png_and_tiff() -> None:
    colour = np.zeros((20, 30, 3), np.uint16)
    colour[..., 0], colour[..., 1], colour[..., 2] = 65535, 32896, 0
    for encoded in (raw_png(colour, 16, 2), _tiff(colour)):
        loaded = load_image(encoded)
        assert loaded.rgba.shape == (20, 30, 4)
        assert tuple(loaded.rgba[0, 0]) == (255, 128, 0, 255)


def _tiff(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pixels, photometric="rgb")
    return buffer.getvalue()


def test_cmyk_jpeg_comes_back_in_rgb() -> None:
    picture = np.zeros((32, 32, 3), np.uint8)
    picture[:, :16] = (200, 30, 30)
    picture[:, 16:] = (30, 30, 200)
    loaded = load_image(encode(Image.fromarray(picture).convert("CMYK"), "JPEG", quality=95))
    assert loaded.source_format == "JPEG"
    assert np.abs(loaded.rgba[16, 4, :3].astype(int) - (200, 30, 30)).max() < 25
    assert np.abs(loaded.rgba[16, 28, :3].astype(int) - (30, 30, 200)).max() < 25


def test_palette_png_with_and_without_transparency() -> None:
    logo = Image.fromarray(samples.logo())  # RGBA, opaque everywhere
    opaque = load_image(encode(logo.convert("RGB").quantize(32), "PNG"))
    assert not opaque.has_alpha and opaque.rgba.shape == (500, 500, 4)

    cut_out = np.asarray(logo).copy()
    cut_out[:100, :, 3] = 0  # a transparent band
    palette = Image.fromarray(cut_out).quantize(32)  # RGBA quantised: palette with transparency
    loaded = load_image(encode(palette, "PNG"))
    assert loaded.has_alpha
    assert loaded.rgba[:100, :, 3].max() == 0
    assert loaded.rgba[200:, :, 3].min() == 255


def test_greyscale_and_grey_alpha() -> None:
    grey = samples.camera()
    loaded = load_image(encode(grey, "PNG"))
    assert np.array_equal(loaded.rgba[..., 0], grey) and np.array_equal(loaded.rgba[..., 2], grey)
    assert not loaded.has_alpha

    alpha = np.zeros_like(grey)
    alpha[100:400, 100:400] = 255
    loaded = load_image(encode(Image.fromarray(np.dstack([grey, alpha]), "LA"), "PNG"))
    assert loaded.has_alpha
    assert np.array_equal(loaded.rgba[..., 3], alpha)


def test_alpha_that_is_opaque_everywhere_is_not_a_mask() -> None:
    loaded = load_image(encode(samples.logo(), "PNG"))
    assert loaded.rgba.shape == (500, 500, 4)
    assert not loaded.has_alpha


def test_big_pictures_are_reduced_while_loading() -> None:
    wide = np.zeros((1000, 3000, 3), np.uint8)
    wide[:, 1500:] = 200
    for fmt in ("PNG", "JPEG"):
        loaded = load_image(encode(wide, fmt))
        assert max(loaded.rgba.shape[:2]) == MAX_WORKING_SIDE
        assert loaded.rgba.shape[0] == 512
        assert loaded.size == (3000, 1000)


# ---------------------------------------------------------------------------------------------
# Refusals


def truncated_png() -> bytes:
    return encode(ASTRONAUT, "PNG")[:5000]


def truncated_jpeg() -> bytes:
    data = encode(ASTRONAUT, "JPEG", quality=90)
    return data[: len(data) // 3]


BAD_PICTURES = {
    "empty": b"",
    "text": b"hello, I am not a picture",
    "random-bytes": np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
    "truncated-png": truncated_png(),
    "truncated-jpeg": truncated_jpeg(),
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "unsupported-format-ppm": encode(np.zeros((16, 16, 3), np.uint8), "PPM"),
    "one-pixel": encode(np.full((1, 1, 3), 128, np.uint8), "PNG"),
    "zero-pixels": png_claiming(0, 0),
    "header-claims-100000x100000": png_claiming(100_000, 100_000),
    "over-8192-a-side": encode(Image.new("L", (9000, 8), 0), "PNG"),
    "over-40-megapixels": encode(Image.new("L", (7000, 7000), 0), "PNG"),
}


@pytest.mark.parametrize("name", sorted(BAD_PICTURES))
def test_bad_pictures_are_refused_naming_the_image(name: str) -> None:
    with pytest.raises(InvalidArgument) as refusal:
        load_image(BAD_PICTURES[name])
    assert refusal.value.field == "image"
    assert str(refusal.value).startswith("image: ")
    assert len(str(refusal.value)) > len("image: ") + 10


def test_messages_say_what_is_wrong() -> None:
    def message(data: bytes) -> str:
        with pytest.raises(InvalidArgument) as refusal:
            load_image(data)
        return str(refusal.value)

    assert "not a picture" in message(b"hello")
    assert "0 bytes" in message(b"")
    assert "truncated" in message(truncated_png())
    assert "8192 pixels a side" in message(BAD_PICTURES["over-8192-a-side"])
    assert "40 megapixels" in message(BAD_PICTURES["over-40-megapixels"])
    assert "decompression bomb" in message(BAD_PICTURES["header-claims-100000x100000"])
    assert "too small" in message(BAD_PICTURES["one-pixel"])


def header_only(png: bytes) -> bytes:
    """A PNG's signature and IHDR chunk (8 + 25 bytes), then the start of an IDAT chunk with no data in
    it: the picture's size, and not one pixel to decode."""
    return png[:33] + struct.pack(">I", 1000) + b"IDAT"


@pytest.mark.parametrize(
    ("name", "says"),
    [("header-claims-100000x100000", "decompression bomb"), ("over-8192-a-side", "8192 pixels a side"),
     ("over-40-megapixels", "40 megapixels")],
)
def test_limits_are_checked_before_any_pixel_is_decoded(name: str, says: str) -> None:
    # Behind the header there is nothing: a loader that decoded first would find the file truncated.
    with pytest.raises(InvalidArgument) as control:
        load_image(header_only(encode(Image.new("L", (64, 64), 0), "PNG")))
    assert "truncated" in str(control.value) or "damaged" in str(control.value), control.value
    with pytest.raises(InvalidArgument) as refusal:
        load_image(header_only(BAD_PICTURES[name]))
    assert says in str(refusal.value)


def test_a_tiny_file_that_decodes_huge_is_refused_without_decoding() -> None:
    # 30000 x 30000 zeros compress to a few kilobytes.
    width = height = 30_000
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(b"\0" * (width + 1)) for _ in range(100)) + compressor.flush()
    bomb = (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b""))
    assert len(bomb) < 100_000
    with pytest.raises(InvalidArgument, match="megapixels"):
        load_image(bomb)


def test_over_the_encoded_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_loading, "MAX_IMAGE_BYTES", 1000)
    with pytest.raises(InvalidArgument, match="MiB"):
        load_image(encode(ASTRONAUT, "PNG"))
    assert MAX_IMAGE_BYTES == 20 * 2**20  # the documented limit, untouched
