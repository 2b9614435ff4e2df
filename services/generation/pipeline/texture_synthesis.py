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

import cv2
import numpy as np

from services.generation.pipeline.records import PreparedImage, Shape, TexturedShape

# Atlas size used only for vertex colours when the texture is off.
VERTEX_COLOUR_ATLAS_SIZE = 256
# Texels of gutter around each half, so bilinear and mipmapped sampling stays inside its half.
GUTTER_SHARE = 1 / 128
# The back: this much darker, blurred over this share of the atlas height.
BACK_BRIGHTNESS = 0.82
BACK_BLUR_SHARE = 1 / 96

EXTRAS_ATLAS = "colour_atlas"
# Points per row of the sampling map (sample_atlas).
_SAMPLE_ROW = 1024
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
    front = _resized(cv2.convertScaleAbs(filled), inner)
    front = cv2.copyMakeBorder(front, gutter, gutter, gutter, gutter, cv2.BORDER_REPLICATE)
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
    # OpenCV's remap, the points laid out as rows of a map (it takes fewer than 2^15 a side):
    # texel centres at +0.5, edges clamped.
    count = len(uv)
    rows = max(1, -(-count // _SAMPLE_ROW))
    maps = np.zeros((2, rows * _SAMPLE_ROW), np.float32)
    maps[0, :count] = uv[:, 0] * width - 0.5
    maps[1, :count] = uv[:, 1] * height - 0.5
    colour = cv2.remap(np.ascontiguousarray(atlas), maps[0].reshape(rows, -1), maps[1].reshape(rows, -1),
                       cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    out = np.empty((count, 4), np.uint8)
    out[:, :3] = colour.reshape(-1, 3)[:count]
    out[:, 3] = 255
    return out


def push_pull_fill(colours: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill the unknown pixels of (H, W, C) colours from the known ones, smoothly, by push-pull."""
    if known.all() or not known.any():
        return colours if known.any() else np.full_like(colours, 128.0)
    colours = np.ascontiguousarray(colours, np.float32)
    known_u8 = known.astype(np.uint8)
    premultiplied = np.zeros_like(colours)
    cv2.copyTo(colours, known_u8, premultiplied)
    weight = known.astype(np.float32)
    pyramid: list[tuple[np.ndarray, np.ndarray]] = []
    while True:
        pyramid.append((premultiplied, weight))
        if min(weight.shape) <= 1 or weight.min() > 0:
            break
        premultiplied, weight = _halve(premultiplied), _halve(weight)
    # Pull: the coarsest level is filled with its own mean; each finer level takes the level above
    # wherever it has no weight of its own.
    premultiplied, weight = pyramid[-1]
    mean = premultiplied.reshape(-1, colours.shape[2]).sum(0) / max(float(weight.sum()), 1e-6)
    current = np.where(weight[..., None] > 0, premultiplied / np.maximum(weight, 1e-6)[..., None], mean)
    current = current.astype(np.float32)
    if len(pyramid) == 1:
        return current
    for premultiplied, weight in reversed(pyramid[1:-1]):
        coarse = _double(current, weight.shape)
        own = premultiplied / np.maximum(weight, 1e-6)[..., None]
        blend = np.minimum(weight, 1.0)[..., None]
        current = own * blend + coarse * (1.0 - blend)
    # The finest level's weights are 0 or 1: each pixel is its own colour or the level above's.
    filled = _double(current, known.shape)
    cv2.copyTo(colours, known_u8, filled)
    return filled


def _halve(values: np.ndarray) -> np.ndarray:
    """Sum over 2x2 blocks, odd edges padded with zeros."""
    height, width = values.shape[:2]
    if height % 2 or width % 2:
        values = cv2.copyMakeBorder(values, 0, height % 2, 0, width % 2, cv2.BORDER_CONSTANT, value=0)
    # An exact halving by area averages each 2x2 block.
    return cv2.resize(values, (values.shape[1] // 2, values.shape[0] // 2), interpolation=cv2.INTER_AREA) * 4.0


def _double(values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Each pixel repeated over a 2x2 block, cut to `shape`'s first two sides (a contiguous copy)."""
    height, width = values.shape[:2]
    doubled = cv2.resize(values, (2 * width, 2 * height), interpolation=cv2.INTER_NEAREST)
    return np.ascontiguousarray(doubled.reshape(2 * height, 2 * width, -1)[: shape[0], : shape[1]])


def _trusted_region(mask: np.ndarray, rgb: np.ndarray | None = None) -> np.ndarray:
    """The mask less a thin band at its edge, where pixels mix object and background colour.

    A soft edge (motion blur, defocus, a cut-out that keeps part of the blend)
    is wider than that band; given the picture, a pixel in the next band
    inwards is trusted only when its colour is close to the nearest pixel
    deeper inside, so a half-background rim is dropped and filled from the
    object instead.
    """
    band = max(2, round(mask.shape[0] / 100))
    trusted = _eroded(mask, band)
    if not trusted.any():
        return mask
    if rgb is None:
        return trusted
    core = _eroded(trusted, 2 * band)
    if not core.any():
        return trusted
    rim = trusted & ~core
    rows, cols = _nearest_in(core, rim)
    inner = rgb[rows, cols].astype(np.int32)
    difference = np.sqrt(((rgb[rim].astype(np.int32) - inner) ** 2).sum(axis=1))
    trusted[rim] = difference <= RIM_COLOUR_TOLERANCE
    return trusted


def _eroded(mask: np.ndarray, steps: int) -> np.ndarray:
    """The mask eroded `steps` times by the 4-neighbour cross, outside the picture counting as empty."""
    cross = cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
    eroded = cv2.erode(mask.astype(np.uint8), cross, iterations=steps, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    return eroded > 0


def _nearest_in(region: np.ndarray, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a nearest pixel of `region` for each of `pixels` (a mask), in raster order.

    OpenCV's chamfer distance (5x5 mask) finds it to within about a pixel of the exact nearest one,
    at a fraction of an exact transform's cost; for a colour from just inside the object that is
    as good.
    """
    # OpenCV measures the distance to zero pixels and labels each zero pixel on its own.
    _, labels = cv2.distanceTransformWithLabels(
        (~region).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL
    )
    ys, xs = np.nonzero(region)
    row_of, col_of = np.zeros(labels.max() + 1, np.int64), np.zeros(labels.max() + 1, np.int64)
    row_of[labels[ys, xs]], col_of[labels[ys, xs]] = ys, xs
    wanted = labels[pixels]
    return row_of[wanted], col_of[wanted]


def _resized(picture: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The picture at (width, height), one axis at a time: averaged over the pixels each output pixel
    covers where it shrinks (so a small atlas does not alias), bilinear where it grows."""
    for axis, target in ((1, size[0]), (0, size[1])):
        if picture.shape[axis] == target:
            continue
        shape = (target, picture.shape[0]) if axis == 1 else (picture.shape[1], target)
        grows = target > picture.shape[axis]
        picture = cv2.resize(picture, shape, interpolation=cv2.INTER_LINEAR if grows else cv2.INTER_AREA)
    return picture


def _back_side(front: np.ndarray, size: int) -> np.ndarray:
    height, width = front.shape[:2]
    # Blur by shrinking and growing back: a wide blur for the cost of two resizes.
    factor = max(1, round(size * BACK_BLUR_SHARE))
    small = cv2.resize(front, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA)
    blurred = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    return cv2.convertScaleAbs(blurred, alpha=BACK_BRIGHTNESS)


def _gutter(size: int) -> int:
    return max(2, round(size * GUTTER_SHARE))
