"""Stage 2: find the object, crop it, recentre it on a square canvas.

The foreground comes from the alpha channel when the picture has a
meaningful one, else from the automatic background removal in
background_removal.py (GrabCut seeded from the picture's border). The soft
mask is resampled with the picture, so the edges stay smooth at the crop's
resolution. The mask chosen is also kept at the picture's own size
(PreparedImage.source_mask): the cut-out a user can look at.
"""
from __future__ import annotations

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

from services.common.errors import InvalidArgument
from services.generation.pipeline.background_removal import (
    NO_FOREGROUND,
    check_share,
    foreground_score,
    largest_component,
)
from services.generation.pipeline.records import LoadedImage, PreparedImage

# The square crop's side is the object's size in source pixels, within these.
MIN_CROP_SIDE = 256
MAX_CROP_SIDE = 1024
# A grid mask needs this many cells left after regularisation to make a solid.
MIN_GRID_CELLS = 16
# Alpha at or above this is foreground.
ALPHA_THRESHOLD = 128
# The neutral colour the crop's background pixels are filled with.
BACKGROUND_FILL = (128, 128, 128)


def prepare_image(
    image: LoadedImage, *, remove_background: str, foreground_ratio: float, resolution: int
) -> PreparedImage:
    rgba = image.rgba
    height, width = rgba.shape[:2]
    alpha_mask = rgba[..., 3] >= ALPHA_THRESHOLD if image.has_alpha else None
    # An alpha channel that keeps every pixel says nothing about the object.
    alpha_is_mask = alpha_mask is not None and not bool(alpha_mask.all())

    if remove_background != "on" and alpha_is_mask:
        score, mask_source = _alpha_score(rgba[..., 3]), "alpha"
    elif remove_background == "off":
        score, mask_source = np.full((height, width), 255, np.uint8), "full"
    else:
        # A contiguous copy in one pass: OpenCV would otherwise copy the strided view at every call.
        score, mask_source = foreground_score(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB)), "segmentation"

    rgb, mask = _crop_square(rgba, score, foreground_ratio)
    grid_mask = _grid_mask(mask, resolution)
    return PreparedImage(
        rgb=rgb, mask=mask, grid_mask=grid_mask, mask_source=mask_source, source_mask=score >= ALPHA_THRESHOLD
    )


def _alpha_score(alpha: np.ndarray) -> np.ndarray:
    """The alpha channel as a uint8 score (foreground at 128 and up), reduced to its largest component
    with small holes filled."""
    mask = alpha >= ALPHA_THRESHOLD
    check_share(mask, "the picture is fully transparent" if not mask.any() else "the opaque part is tiny")
    cleaned = largest_component(mask)
    cleaned = _fill_small_holes(cleaned, max_hole=max(16, cleaned.sum() // 500))
    # Keep the soft edge where the clean mask agrees, force the rest.
    return np.where(cleaned, np.maximum(alpha, ALPHA_THRESHOLD), np.minimum(alpha, ALPHA_THRESHOLD - 1)).astype(
        np.uint8
    )


def _fill_small_holes(mask: np.ndarray, max_hole: int) -> np.ndarray:
    holes, count = ndimage.label(~mask)
    if count <= 1:
        return mask
    sizes = np.bincount(holes.ravel())
    touches_border = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
    small = sizes <= max_hole
    small[0] = False
    small[touches_border] = False
    return mask | small[holes]


def _crop_square(rgba: np.ndarray, score: np.ndarray, foreground_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop around the mask's bounding box onto a square where the object's longer side fills
    foreground_ratio. rgba: the picture (its alpha is not read); score: (H, W) uint8, foreground at
    128 and above."""
    inside = score >= 128
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        raise InvalidArgument("image", f"{NO_FOREGROUND}: the mask is empty")
    top, bottom, left, right = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    side = max(bottom - top, right - left) / foreground_ratio
    centre_y, centre_x = (top + bottom) / 2.0, (left + right) / 2.0
    x0, y0 = centre_x - side / 2.0, centre_y - side / 2.0
    out_side = int(np.clip(round(side), MIN_CROP_SIDE, MAX_CROP_SIDE))
    scale = out_side / side

    height, width = score.shape
    ix0, iy0 = max(0.0, x0), max(0.0, y0)
    ix1, iy1 = min(float(width), x0 + side), min(float(height), y0 + side)
    ox0, oy0 = round((ix0 - x0) * scale), round((iy0 - y0) * scale)
    ox1, oy1 = round((ix1 - x0) * scale), round((iy1 - y0) * scale)

    # Only the pixels the crop covers (plus one for the filter's reach) go through PIL.
    px0, py0 = max(0, int(ix0) - 1), max(0, int(iy0) - 1)
    px1, py1 = min(width, int(np.ceil(ix1)) + 1), min(height, int(np.ceil(iy1)) + 1)
    region = rgba[py0:py1, px0:px1].copy()
    region[..., 3] = score[py0:py1, px0:px1]
    # RGBA resampling in PIL is alpha-premultiplied, so background colour does not bleed into the edge.
    patch = Image.fromarray(region, "RGBA").resize(
        (ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=(ix0 - px0, iy0 - py0, ix1 - px0, iy1 - py0),
        reducing_gap=None,
    )
    canvas = np.zeros((out_side, out_side, 4), np.uint8)
    canvas[oy0:oy1, ox0:ox1] = np.asarray(patch)
    mask = largest_component(canvas[..., 3] >= 128)
    rgb_out = np.empty((out_side, out_side, 3), np.uint8)
    rgb_out[:] = BACKGROUND_FILL
    cv2.copyTo(cv2.cvtColor(canvas, cv2.COLOR_RGBA2RGB), mask.astype(np.uint8), rgb_out)
    return rgb_out, mask


def _grid_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize((resolution, resolution), Image.Resampling.BOX)
    grid = regularize_grid_mask(np.asarray(coverage) >= 128)
    if grid.sum() < MIN_GRID_CELLS:
        raise InvalidArgument(
            "image", f"{NO_FOREGROUND}: the object is too thin to build a solid at resolution {resolution}"
        )
    return grid


def regularize_grid_mask(mask: np.ndarray, max_rounds: int = 64) -> np.ndarray:
    """Make a cell mask that meshes into a closed 2-manifold: the largest 4-connected part, no
    one-cell-thick parts, no cells touching only at a corner.

    The cell-corner mesher (backends/inflate.py) shares the corners on the mask's outline between the
    front and back surfaces. That is a manifold exactly when every pair of edge-adjacent cells lies in a
    full 2x2 block of cells and no two cells touch only diagonally. Thin parts and corner contacts are
    thickened (cells are only ever added, so no thin limb is cut off), then the largest part is kept.
    """
    cells = np.asarray(mask, bool)
    for _ in range(max_rounds):
        fill = _violations(cells)
        if not fill.any():
            break
        cells = cells | fill
    else:  # pragma: no cover - the fill only grows, so it settles long before this.
        raise RuntimeError("grid mask regularisation did not settle")
    return largest_component(cells) if cells.any() else cells


def _violations(cells: np.ndarray) -> np.ndarray:
    """Cells to add: completing 2x2 blocks for neck pairs and diagonal contacts."""
    fill = np.zeros_like(cells)
    for transposed in (False, True):
        grid = cells.T if transposed else cells
        add = np.zeros_like(grid)
        blocks = grid[:-1, :-1] & grid[:-1, 1:] & grid[1:, :-1] & grid[1:, 1:]  # by top-left
        pairs = grid[:, :-1] & grid[:, 1:]  # horizontal pairs (R, R-1), by left cell
        block_above = np.zeros_like(pairs)
        block_above[1:] = blocks
        block_below = np.zeros_like(pairs)
        block_below[:-1] = blocks
        neck = pairs & ~block_above & ~block_below
        if neck.any():
            # Complete the block on the side that already has more cells (below when level).
            above_count = np.zeros(pairs.shape, np.int8)
            above_count[1:] = grid[:-1, :-1].astype(np.int8) + grid[:-1, 1:]
            below_count = np.zeros(pairs.shape, np.int8)
            below_count[:-1] = grid[1:, :-1].astype(np.int8) + grid[1:, 1:]
            rows = np.arange(pairs.shape[0])[:, None]
            go_up = (above_count > below_count) | (rows == pairs.shape[0] - 1)
            go_up &= rows > 0
            up = neck & go_up
            down = neck & ~go_up
            add[:-1, :-1] |= up[1:]
            add[:-1, 1:] |= up[1:]
            add[1:, :-1] |= down[:-1]
            add[1:, 1:] |= down[:-1]
        fill |= add.T if transposed else add
    # Diagonal contacts: two cells share a corner and nothing else.
    a, b, c, d = cells[:-1, :-1], cells[:-1, 1:], cells[1:, :-1], cells[1:, 1:]
    diagonal = (a & d & ~b & ~c) | (b & c & ~a & ~d)
    if diagonal.any():
        fill[:-1, :-1] |= diagonal
        fill[:-1, 1:] |= diagonal
        fill[1:, :-1] |= diagonal
        fill[1:, 1:] |= diagonal
    return fill & ~cells
