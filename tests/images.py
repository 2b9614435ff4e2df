"""Test pictures, made offline from scikit-image's bundled samples."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image
from skimage import data as samples
from skimage.transform import resize


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **save: object) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, format=fmt, **save)
    return buf.getvalue()


def photo(name: str = "astronaut", side: int = 512) -> np.ndarray:
    """A sample photo as (side, side, 3|4) uint8."""
    img = getattr(samples, name)()
    if img.dtype == bool:
        img = np.where(img, 0, 255).astype(np.uint8)  # horse: black silhouette on white
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    out = resize(img, (side, side), preserve_range=True, anti_aliasing=True)
    return out.astype(np.uint8)


def photo_png(name: str = "astronaut", side: int = 512) -> bytes:
    return encode(photo(name, side), "PNG")


def photo_jpeg(name: str = "chelsea", side: int = 512) -> bytes:
    return encode(photo(name, side)[..., :3], "JPEG", quality=90)


def disk_png(side: int = 256, radius_ratio: float = 0.35) -> bytes:
    """A filled white disk on black: the picture the inflate backend turns into a sphere."""
    yy, xx = np.mgrid[0:side, 0:side]
    centre = (side - 1) / 2
    disk = (xx - centre) ** 2 + (yy - centre) ** 2 <= (radius_ratio * side) ** 2
    rgba = np.zeros((side, side, 4), np.uint8)
    rgba[disk] = (230, 120, 40, 255)
    return encode(rgba, "PNG")
