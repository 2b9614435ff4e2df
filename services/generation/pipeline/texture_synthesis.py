"""Stage 4: colour the shape from the picture.

Atlas layout (texture_size T, square): the left half holds the front, the
right half the back. Each half is the picture's square crop stretched onto
a (T/2) x T rectangle with a small gutter, so a vertex at (x, y) in the
shared frame maps to the same spot of either half; the front is the picture
projected orthographically along z, and the back, seen from behind, is the
front mirrored, blurred and darkened a little (a plausible guess at what the
camera could not see).

Colours never come from the background: the crop's colours are trusted
only a little inside the mask, and the rest of the atlas is filled from
them by push-pull (averaging down an image pyramid of the trusted pixels
and filling every gap from the level above), so the silhouette's rim and
any texel a seam samples carry object colour.

Vertex colours are always filled, sampled from the same atlas (built small
when the texture itself is off). The atlas and its layout go into
TexturedShape.extras so mesh_export can map the decimated mesh the same way.
No randomness is involved: `seed` does not change the output.

That layout suits reliefs ("two_sided" shapes: inflate). A learned model's
shape ("atlas", see records.py) gets a UV atlas of its own, decimated first
and baked from the picture: pipeline/uv_atlas.py.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from services.generation.pipeline.records import PreparedImage, Shape, TexturedShape

# Atlas size used only for vertex colours when the texture is off.
VERTEX_COLOUR_ATLAS_SIZE = 256
# Texels of gutter around each half, so bilinear and mipmapped sampling stays inside its half.
GUTTER_SHARE = 1 / 128
# The back: this much darker, blurred over this share of the atlas height.
BACK_BRIGHTNESS = 0.82
BACK_BLUR_SHARE = 1 / 96

EXTRAS_ATLAS = "colour_atlas"
# How far (RGB distance) a rim pixel's colour may be from the object's colour just inside it.
RIM_COLOUR_TOLERANCE = 40.0


def synthesize_texture(
    shape: Shape, image: PreparedImage, *, texture: bool, texture_size: int, seed: int
) -> TexturedShape:
    if shape.texture_mapping == "atlas":
        # Imported here: uv_atlas uses mesh_export, which uses this module.
        from services.generation.pipeline.uv_atlas import synthesize_atlas_texture

        return synthesize_atlas_texture(shape, image, texture=texture, texture_size=texture_size)
    size = texture_size if texture else VERTEX_COLOUR_ATLAS_SIZE
    atlas = build_atlas(image.rgb, image.mask, size)
    vertex_colors = sample_atlas(atlas, atlas_uv(shape.vertices[:, :2], shape.vertices[:, 2] < 0, size))
    return TexturedShape(
        shape=shape,
        texture=atlas if texture else None,
        vertex_colors=vertex_colors,
        extras={EXTRAS_ATLAS: atlas},
    )


def build_atlas(rgb: np.ndarray, mask: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 3) uint8: front half left, back half right."""
    half = size // 2
    gutter = _gutter(size)
    trusted = _trusted_region(mask, rgb)
    filled = push_pull_fill(rgb.astype(np.float32), trusted)
    inner = (half - 2 * gutter, size - 2 * gutter)
    front = np.asarray(
        Image.fromarray(np.clip(filled + 0.5, 0, 255).astype(np.uint8)).resize(inner, Image.Resampling.BILINEAR)
    )
    front = np.pad(front, ((gutter, gutter), (gutter, gutter), (0, 0)), mode="edge")
    back = _back_side(front, size)
    atlas = np.empty((size, size, 3), np.uint8)
    atlas[:, :half] = front
    atlas[:, half : 2 * half] = back
    if size % 2:
        atlas[:, -1] = back[:, -1]
    return atlas


def atlas_uv(xy: np.ndarray, is_back: np.ndarray, size: int) -> np.ndarray:
    """(N, 2) float32 texture coordinates, glTF convention (origin top-left, v down), of frame
    positions (x, y in [-0.5, 0.5]) on the front or the back half."""
    half = size // 2
    gutter = _gutter(size)
    u_texels = gutter + (np.clip(xy[:, 0], -0.5, 0.5) + 0.5) * (half - 2 * gutter) + np.where(is_back, half, 0)
    v_texels = gutter + (0.5 - np.clip(xy[:, 1], -0.5, 0.5)) * (size - 2 * gutter)
    return np.stack([u_texels / size, v_texels / size], axis=1).astype(np.float32)


def sample_atlas(atlas: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """(N, 4) uint8 RGBA: the atlas sampled bilinearly at glTF texture coordinates, alpha opaque."""
    height, width = atlas.shape[:2]
    x = np.clip(uv[:, 0] * width - 0.5, 0, width - 1)
    y = np.clip(uv[:, 1] * height - 0.5, 0, height - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    colour = (
        atlas[y0, x0] * ((1 - fx) * (1 - fy))
        + atlas[y0, x1] * (fx * (1 - fy))
        + atlas[y1, x0] * ((1 - fx) * fy)
        + atlas[y1, x1] * (fx * fy)
    )
    out = np.empty((len(uv), 4), np.uint8)
    out[:, :3] = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    out[:, 3] = 255
    return out


def push_pull_fill(colours: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill the unknown pixels of (H, W, C) colours from the known ones, smoothly, by push-pull."""
    if known.all() or not known.any():
        return colours if known.any() else np.full_like(colours, 128.0)
    weight = known.astype(np.float32)
    premultiplied = colours * weight[..., None]
    pyramid: list[tuple[np.ndarray, np.ndarray]] = []
    while True:
        pyramid.append((premultiplied, weight))
        if min(weight.shape) <= 1 or weight.min() > 0:
            break
        premultiplied, weight = _halve(premultiplied), _halve(weight[..., None])[..., 0]
    # Pull: the coarsest level is filled with its own mean; each finer level takes the level above
    # wherever it has no weight of its own.
    premultiplied, weight = pyramid[-1]
    mean = premultiplied.reshape(-1, colours.shape[2]).sum(0) / max(float(weight.sum()), 1e-6)
    current = np.where(weight[..., None] > 0, premultiplied / np.maximum(weight, 1e-6)[..., None], mean)
    for premultiplied, weight in reversed(pyramid[:-1]):
        coarse = _double(current, weight.shape)
        own = premultiplied / np.maximum(weight, 1e-6)[..., None]
        blend = np.minimum(weight, 1.0)[..., None]
        current = own * blend + coarse * (1.0 - blend)
    return current


def _halve(values: np.ndarray) -> np.ndarray:
    """Sum over 2x2 blocks, odd edges padded with zeros."""
    height, width = values.shape[:2]
    padded = np.pad(values, ((0, height % 2), (0, width % 2), (0, 0)))
    return padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]


def _double(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return np.repeat(np.repeat(values, 2, axis=0), 2, axis=1)[: shape[0], : shape[1]]


def _trusted_region(mask: np.ndarray, rgb: np.ndarray | None = None) -> np.ndarray:
    """The mask less a thin band at its edge, where pixels mix object and background colour.

    A soft edge (motion blur, defocus, a cut-out that keeps part of the blend)
    is wider than that band; given the picture, a pixel in the next band
    inwards is trusted only when its colour is close to the nearest pixel
    deeper inside, so a half-background rim is dropped and filled from the
    object instead.
    """
    band = max(2, round(mask.shape[0] / 100))
    trusted = ndimage.binary_erosion(mask, iterations=band, border_value=0)
    if not trusted.any():
        return mask
    if rgb is None:
        return trusted
    core = ndimage.binary_erosion(trusted, iterations=2 * band, border_value=0)
    if not core.any():
        return trusted
    rim = trusted & ~core
    _, (rows, cols) = ndimage.distance_transform_edt(~core, return_indices=True)
    inner = rgb[rows[rim], cols[rim]].astype(np.int32)
    difference = np.sqrt(((rgb[rim].astype(np.int32) - inner) ** 2).sum(axis=1))
    trusted[rim] = difference <= RIM_COLOUR_TOLERANCE
    return trusted


def _back_side(front: np.ndarray, size: int) -> np.ndarray:
    height, width = front.shape[:2]
    # Blur by shrinking and growing back: a wide blur for the cost of two resizes.
    factor = max(1, round(size * BACK_BLUR_SHARE))
    small = Image.fromarray(front).resize((max(1, width // factor), max(1, height // factor)), Image.Resampling.BOX)
    blurred = np.asarray(small.resize((width, height), Image.Resampling.BILINEAR), np.float32)
    return np.clip(blurred * BACK_BRIGHTNESS + 0.5, 0, 255).astype(np.uint8)


def _gutter(size: int) -> int:
    return max(2, round(size * GUTTER_SHARE))
