"""Stage 2: find the object, crop it, recentre it on a square canvas.

The foreground comes from the alpha channel when the picture has a
meaningful one, else from an automatic background removal: the background
colours are learnt from the picture's border, every pixel is scored by its
colour distance to them, the score is thresholded (Otsu, with a floor so a
plain picture finds nothing) and the mask cleaned up (largest component,
holes filled, specks removed). The work is done on a small copy; the soft
mask is then resampled with the picture, so the edges stay smooth at the
crop's resolution.
"""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from services.common.errors import InvalidArgument
from services.generation.pipeline.records import LoadedImage, PreparedImage

# Side of the small copy the segmentation works on.
WORK_SIDE = 256
# The square crop's side is the object's size in source pixels, within these.
MIN_CROP_SIDE = 256
MAX_CROP_SIDE = 1024
# A foreground smaller than this share of the picture is noise, not an object.
MIN_FOREGROUND_SHARE = 0.005
# Segmentation that keeps more than this share found no background at all.
MAX_SEGMENTED_SHARE = 0.95
# A grid mask needs this many cells left after regularisation to make a solid.
MIN_GRID_CELLS = 16
# Width of the border band the background is learnt from, as a share of the shorter side.
BORDER_BAND = 0.03
# Colour distance (in _colour_features units, 0..~1) below which a pixel is background whatever Otsu says.
MIN_CONTRAST = 0.06
# A smooth background field whose median misfit on the border exceeds this is not used.
SMOOTH_BACKGROUND_RESIDUAL = 0.04
# Alpha at or above this is foreground.
ALPHA_THRESHOLD = 128
# The neutral colour the crop's background pixels are filled with.
BACKGROUND_FILL = (128, 128, 128)

_NO_FOREGROUND = "no foreground found"


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
        score, mask_source = _segment(rgba[..., :3]), "segmentation"

    rgb, mask = _crop_square(rgba[..., :3], score, foreground_ratio)
    grid_mask = _grid_mask(mask, resolution)
    return PreparedImage(rgb=rgb, mask=mask, grid_mask=grid_mask, mask_source=mask_source)


def _alpha_score(alpha: np.ndarray) -> np.ndarray:
    """The alpha channel as a uint8 score (foreground at 128 and up), reduced to its largest component
    with small holes filled."""
    mask = alpha >= ALPHA_THRESHOLD
    _check_share(mask, "the picture is fully transparent" if not mask.any() else "the opaque part is tiny")
    cleaned = _largest_component(mask)
    cleaned = _fill_small_holes(cleaned, max_hole=max(16, cleaned.sum() // 500))
    # Keep the soft edge where the clean mask agrees, force the rest.
    return np.where(cleaned, np.maximum(alpha, ALPHA_THRESHOLD), np.minimum(alpha, ALPHA_THRESHOLD - 1)).astype(
        np.uint8
    )


def _segment(rgb: np.ndarray) -> np.ndarray:
    """Automatic background removal: a uint8 foreground score (128 and up) at the picture's size."""
    height, width = rgb.shape[:2]
    scale = min(1.0, WORK_SIDE / max(height, width))
    small_size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small = np.asarray(Image.fromarray(rgb).resize(small_size, Image.Resampling.BOX), np.float32) / 255.0
    # A light blur so that texture and JPEG noise do not read as foreground.
    small = ndimage.uniform_filter(small, size=(3, 3, 1), mode="nearest")
    features = _colour_features(small)
    sides = _border_sides(features.shape[:2])

    # Two background models, and a pixel is background when either explains it: a smooth colour
    # field (studio backdrops, gradients, vignetting) and a few flat colours (a table and a wall).
    distance = _distance_to_background_colours(features, sides)
    smooth = _distance_to_smooth_background(features, sides)
    if smooth is not None:
        distance = np.minimum(distance, smooth)
    mask = distance > max(_otsu(distance), MIN_CONTRAST)
    if not mask.any():
        raise InvalidArgument("image", f"{_NO_FOREGROUND}: the picture looks like plain background")
    mask = ndimage.binary_opening(mask)
    mask = _largest_component(mask)
    mask = ndimage.binary_fill_holes(mask)
    _check_share(mask, "nothing stands out from the background")
    if mask.mean() > MAX_SEGMENTED_SHARE:
        raise InvalidArgument(
            "image",
            f"{_NO_FOREGROUND}: could not tell the object from the background; "
            "use a picture of one object on a plain background, or a PNG with transparency",
        )
    soft = ndimage.gaussian_filter(mask.astype(np.float32) * 255.0, sigma=0.8, mode="constant")
    # Back to the picture's size so that the crop resamples colour and mask alike.
    score = Image.fromarray(np.clip(soft + 0.5, 0, 255).astype(np.uint8), "L")
    return np.asarray(score.resize((width, height), Image.Resampling.BILINEAR))


def _colour_features(rgb: np.ndarray) -> np.ndarray:
    """An opponent colour space where brightness counts less than hue, so soft shadows stay background."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    lightness = (r + g + b) * (0.6 / 3.0)
    red_green = (r - g) * 0.9
    yellow_blue = ((r + g) * 0.5 - b) * 0.9
    return np.stack([lightness, red_green, yellow_blue], axis=-1)


def _border_sides(shape: tuple[int, int]) -> np.ndarray:
    """(H, W) int8: 0 inside, 1..4 for the top, bottom, left and right border bands."""
    height, width = shape
    band = max(2, round(BORDER_BAND * min(height, width)))
    sides = np.zeros(shape, np.int8)
    sides[:, :band], sides[:, -band:] = 3, 4
    sides[:band], sides[-band:] = 1, 2
    return sides


def _distance_to_smooth_background(features: np.ndarray, sides: np.ndarray) -> np.ndarray | None:
    """Distance to a quadratic colour field fitted to the border, robustly (Cauchy weights), so the
    part of an object that touches the border does not pull the fit; None when the border is too
    busy for such a field to be the background (it would then explain half the object too)."""
    height, width = sides.shape
    ys = np.linspace(-1.0, 1.0, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, width, dtype=np.float32)[None, :]
    ys, xs = np.broadcast_to(ys, (height, width)), np.broadcast_to(xs, (height, width))
    border = sides > 0
    stride = max(1, int(border.sum()) // 3000)
    basis = _quadratic_basis(xs[border][::stride], ys[border][::stride]).astype(np.float64)
    targets = features[border][::stride].astype(np.float64)
    weights = np.ones(len(targets))
    for _ in range(4):
        # Weighted normal equations: a 6x6 solve, far cheaper than an SVD of the whole border.
        weighted = basis * weights[:, None]
        coefficients = np.linalg.solve(weighted.T @ basis + 1e-6 * np.eye(basis.shape[1]), weighted.T @ targets)
        residual = np.sqrt(((targets - basis @ coefficients) ** 2).sum(-1))
        scale = 1.5 * float(np.median(residual)) + 0.01
        weights = 1.0 / (1.0 + (residual / scale) ** 2)
    if np.median(residual) > SMOOTH_BACKGROUND_RESIDUAL:
        return None
    # Evaluated term by term rather than as a matmul: no BLAS threads for this small product.
    terms = (np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys)
    predicted = sum(term[..., None] * weight.astype(np.float32) for term, weight in zip(terms, coefficients))
    return np.sqrt(((features - predicted) ** 2).sum(-1))


def _quadratic_basis(xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)


def _distance_to_background_colours(features: np.ndarray, sides: np.ndarray, clusters: int = 4) -> np.ndarray:
    """Distance to the nearest of a few border colours (k-means, deterministic farthest-point start).

    A colour that covers a good share of only one side is more likely the object running off the
    picture than background, so it is left out.
    """
    border = sides > 0
    stride = max(1, int(border.sum()) // 2000)
    samples = features[border][::stride].astype(np.float32)
    sample_sides = sides[border][::stride]
    centres = [np.median(samples, axis=0)]
    for _ in range(clusters - 1):
        gap = np.min([np.sum((samples - c) ** 2, axis=1) for c in centres], axis=0)
        centres.append(samples[int(np.argmax(gap))])
    centre_array = np.array(centres, np.float32)
    for _ in range(8):
        labels = _nearest(samples, centre_array)
        sums = np.stack([np.bincount(labels, samples[:, c], minlength=clusters) for c in range(3)], axis=1)
        counts = np.bincount(labels, minlength=clusters)[:, None]
        centre_array = np.where(counts > 0, sums / np.maximum(counts, 1), centre_array)
    labels = _nearest(samples, centre_array)

    side_totals = np.bincount(sample_sides, minlength=5)[1:].astype(np.float64)
    kept = []
    for k in range(clusters):
        on_side = np.bincount(sample_sides[labels == k], minlength=5)[1:] / np.maximum(side_totals, 1)
        share = (labels == k).mean()
        if share >= 0.05 and ((on_side >= 0.15).sum() >= 2 or share >= 0.5):
            kept.append(centre_array[k])
    if not kept:
        return np.full(sides.shape, np.inf, np.float32)
    best = np.full(sides.shape, np.inf, np.float32)
    for centre in kept:
        best = np.minimum(best, ((features - centre) ** 2).sum(-1))
    return np.sqrt(best)


def _nearest(samples: np.ndarray, centres: np.ndarray) -> np.ndarray:
    return np.argmin(((samples[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    top = float(np.percentile(values, 99.5))
    if top <= 0:
        return 0.0
    hist, edges = np.histogram(np.minimum(values, top), bins=bins, range=(0.0, top))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) * 0.5
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def _check_share(mask: np.ndarray, why: str) -> None:
    if mask.mean() < MIN_FOREGROUND_SHARE:
        raise InvalidArgument("image", f"{_NO_FOREGROUND}: {why}")


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask.copy()
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


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


def _crop_square(rgb: np.ndarray, score: np.ndarray, foreground_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Crop around the mask's bounding box onto a square where the object's longer side fills
    foreground_ratio. score: (H, W) uint8, foreground at 128 and above."""
    inside = score >= 128
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size == 0:
        raise InvalidArgument("image", f"{_NO_FOREGROUND}: the mask is empty")
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
    region = np.empty((py1 - py0, px1 - px0, 4), np.uint8)
    region[..., :3] = rgb[py0:py1, px0:px1]
    region[..., 3] = score[py0:py1, px0:px1]
    # RGBA resampling in PIL is alpha-premultiplied, so background colour does not bleed into the edge.
    patch = Image.fromarray(region, "RGBA").resize(
        (ox1 - ox0, oy1 - oy0), Image.Resampling.BILINEAR, box=(ix0 - px0, iy0 - py0, ix1 - px0, iy1 - py0),
        reducing_gap=None,
    )
    canvas = np.zeros((out_side, out_side, 4), np.uint8)
    canvas[oy0:oy1, ox0:ox1] = np.asarray(patch)
    mask = _largest_component(canvas[..., 3] >= 128)
    rgb_out = canvas[..., :3].copy()
    rgb_out[~mask] = BACKGROUND_FILL
    return rgb_out, mask


def _grid_mask(mask: np.ndarray, resolution: int) -> np.ndarray:
    coverage = Image.fromarray(mask.astype(np.uint8) * 255).resize((resolution, resolution), Image.Resampling.BOX)
    grid = regularize_grid_mask(np.asarray(coverage) >= 128)
    if grid.sum() < MIN_GRID_CELLS:
        raise InvalidArgument(
            "image", f"{_NO_FOREGROUND}: the object is too thin to build a solid at resolution {resolution}"
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
    return _largest_component(cells) if cells.any() else cells


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
