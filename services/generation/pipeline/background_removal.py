"""Automatic background removal (`remove_background` auto/on without an alpha mask): OpenCV's GrabCut,
seeded from a model of the picture's border.

1. The border model: the background's colours are learnt from the picture's border (a few flat colours,
   and a smooth colour field for backdrops and gradients); a pixel neither explains is "unexplained".
   Nothing unexplained, or too little, is the "no foreground found" refusal.
2. The seeds. A thin frame around the picture is certain background where the border model explains it.
   Where it does not, something runs off the picture: a run that reaches a corner of the frame is taken
   for background (a wall, a table, a person behind), any other for the object running off an edge.
   What is colour-continuous with a background run (OpenCV's flood fill) is not seeded as the object, so
   a background thing that touches the edge is not kept for being unexplained. The probable foreground is
   the largest unexplained part left, plus a central ellipse (people centre their subject, and it
   catches parts of the object coloured like the background); everything else is probable background.
3. GrabCut (colour mixtures and a contrast-sensitive min-cut) on a copy of WORK_SIDE pixels; should it
   lose the object altogether, once more with the middle of the picture held as foreground. Then one
   more pass with the learnt colour models in a narrow band around the edge at REFINE_SIDE pixels, so the
   outline is accurate at a fraction of a full-size pass's cost.

The result is a uint8 score at the picture's size (foreground at 128 and up) with a soft edge.
OpenCV's random generator (GrabCut's k-means) is seeded before each use: the same picture always gives
the same mask.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from services.common.errors import InvalidArgument

# Long side of the copy the border model and the first GrabCut work on.
WORK_SIDE = 128
# Long side at which the outline is refined.
REFINE_SIDE = 256
# GrabCut iterations on the small copy.
GRABCUT_ITERATIONS = 2
# Half-width, in REFINE_SIDE pixels, of the band around the outline the refinement may move.
REFINE_BAND = 3
# Width of the border band the background colours are learnt from, as a share of the shorter side.
BORDER_BAND = 0.03
# Width of the frame seeded as certain background, as a share of the shorter side.
FRAME_BAND = 0.06
# Semi-axes of the central ellipse seeded as probable foreground, as shares of the picture's sides.
CENTRE_PRIOR = 0.35
# Semi-axes of the central ellipse held as foreground when a first GrabCut loses the object.
ANCHOR = 0.12
# Largest colour step (0..255 per channel) between neighbours that a background run's flood fill crosses.
FLOOD_STEP = 10
# Colour distance (in _colour_features units, 0..~1) below which a pixel is background whatever Otsu says.
MIN_CONTRAST = 0.06
# A smooth background field whose median misfit on the border exceeds this is not used.
SMOOTH_BACKGROUND_RESIDUAL = 0.04
# A foreground smaller than this share of the picture is noise, not an object.
MIN_FOREGROUND_SHARE = 0.005
# Segmentation that keeps more than this share found no background at all.
MAX_SEGMENTED_SHARE = 0.95

NO_FOREGROUND = "no foreground found"


def foreground_score(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 picture -> (H, W) uint8 foreground score, foreground at 128 and up."""
    height, width = rgb.shape[:2]
    small = _resized(rgb, WORK_SIDE)
    unexplained = _unexplained_by_border(small)
    if not unexplained.any():
        raise InvalidArgument("image", f"{NO_FOREGROUND}: the picture looks like plain background")
    cleaned = fill_holes(largest_component(ndimage.binary_opening(unexplained)))
    _check_share(cleaned)

    seeds = _seeds(small, unexplained, cleaned)
    bgr = np.ascontiguousarray(small[..., ::-1])
    mask, background_model, foreground_model = _grabcut(bgr, seeds)
    if mask.mean() < MIN_FOREGROUND_SHARE:
        # GrabCut lost the object (one coloured much like the background: a grey vase on a grey wall).
        # Once more, with the middle of the picture held as foreground.
        seeds[_centre_ellipse(seeds.shape, ANCHOR)] = cv2.GC_FGD
        mask, background_model, foreground_model = _grabcut(bgr, seeds)
    _check_share(mask)

    if max(height, width) > max(small.shape[:2]):
        mask = _refine(_resized(rgb, REFINE_SIDE), mask, background_model, foreground_model)
        _check_share(mask)
    # A light blur before upsampling: a smooth edge for the crop to resample.
    soft = cv2.GaussianBlur(mask.astype(np.float32) * 255.0, (0, 0), 0.7)
    score = cv2.resize(soft, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(score + 0.5, 0, 255).astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected part of a mask (the first in raster order on a tie)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=4)
    if count <= 2:  # label 0 is the background
        return mask.astype(bool, copy=True)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every part of the background that does not reach the border (4-connected) filled."""
    height, width = mask.shape
    outside = np.ones((height + 2, width + 2), np.uint8)
    outside[1:-1, 1:-1] = ~mask
    cv2.floodFill(outside, None, (0, 0), 0, flags=4)  # the frame added around joins all of the border
    return mask | (outside[1:-1, 1:-1] > 0)


def check_share(mask: np.ndarray, why: str) -> None:
    if mask.mean() < MIN_FOREGROUND_SHARE:
        raise InvalidArgument("image", f"{NO_FOREGROUND}: {why}")


def _check_share(mask: np.ndarray) -> None:
    check_share(mask, "nothing stands out from the background")
    if mask.mean() > MAX_SEGMENTED_SHARE:
        raise InvalidArgument(
            "image",
            f"{NO_FOREGROUND}: could not tell the object from the background; "
            "use a picture of one object on a plain background, or a PNG with transparency",
        )


def _resized(rgb: np.ndarray, long_side: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    scale = min(1.0, long_side / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    if size == (width, height):
        return np.ascontiguousarray(rgb)
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _grabcut(bgr: np.ndarray, seeds: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GrabCut from these initial labels -> (foreground mask, background model, foreground model)."""
    labels = seeds.copy()
    background_model, foreground_model = np.zeros((1, 65)), np.zeros((1, 65))
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, labels, None, background_model, foreground_model, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    return _foreground(labels), background_model, foreground_model


def _centre_ellipse(shape: tuple[int, int], semi_axis: float) -> np.ndarray:
    """(h, w) bool: the ellipse centred on the picture with semi-axes semi_axis times its sides."""
    height, width = shape
    ys = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5
    xs = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5
    return (ys / semi_axis) ** 2 + (xs / semi_axis) ** 2 < 1.0


def _foreground(labels: np.ndarray) -> np.ndarray:
    """GrabCut's labels -> the largest foreground part, holes filled (the mesh needs one solid)."""
    mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    return fill_holes(largest_component(mask)) if mask.any() else mask


# ------------------------------------------------------------------------------------------------- seeds
def _seeds(small: np.ndarray, unexplained: np.ndarray, cleaned: np.ndarray) -> np.ndarray:
    """GrabCut's initial labels on the small copy (see the module's docstring, step 2)."""
    height, width = unexplained.shape
    band = max(2, round(FRAME_BAND * min(height, width)))
    frame = np.ones((height, width), bool)
    frame[band:-band, band:-band] = False
    corners = np.zeros((height, width), bool)
    for rows in (slice(None, band), slice(-band, None)):
        for cols in (slice(None, band), slice(-band, None)):
            corners[rows, cols] = True
    runs, _ = ndimage.label(unexplained & frame)
    background_runs = np.isin(runs, np.unique(runs[corners & (runs > 0)])) & (runs > 0)
    object_runs = (runs > 0) & ~background_runs

    flooded = _flood_from(small, background_runs)
    core = ndimage.binary_opening(unexplained) & ~flooded
    core = fill_holes(largest_component(core)) if core.any() else cleaned
    centre = _centre_ellipse((height, width), CENTRE_PRIOR)

    seeds = np.where(core | centre, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    seeds[frame & ~unexplained] = cv2.GC_BGD
    seeds[background_runs] = cv2.GC_BGD
    seeds[object_runs] = cv2.GC_PR_FGD
    return seeds


def _flood_from(rgb: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Pixels reachable from `sources` through colour steps of at most FLOOD_STEP (4-connected)."""
    height, width = sources.shape
    filled = np.zeros((height + 2, width + 2), np.uint8)  # floodFill's mask has a one-pixel margin
    if not sources.any():
        return np.zeros((height, width), bool)
    image = np.ascontiguousarray(rgb)
    step = (FLOOD_STEP,) * 3
    flags = 4 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    ys, xs = np.nonzero(sources)
    # Every third source pixel: a run of several colours (a flag's stripes) is flooded from each.
    for y, x in zip(ys[::3].tolist(), xs[::3].tolist()):
        if not filled[y + 1, x + 1]:
            cv2.floodFill(image, filled, (x, y), 0, step, step, flags)
    return filled[1:-1, 1:-1] > 0


def _refine(picture: np.ndarray, coarse: np.ndarray, background_model: np.ndarray,
            foreground_model: np.ndarray) -> np.ndarray:
    """One GrabCut pass with the learnt colour models, at `picture`'s size, free only near the outline."""
    height, width = picture.shape[:2]
    up = cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR) >= 0.5
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * REFINE_BAND + 1, 2 * REFINE_BAND + 1))
    inner = cv2.erode(up.astype(np.uint8), kernel) > 0
    outer = cv2.dilate(up.astype(np.uint8), kernel) > 0
    labels = np.where(up, cv2.GC_PR_FGD, cv2.GC_PR_BGD).astype(np.uint8)
    labels[inner] = cv2.GC_FGD
    labels[~outer] = cv2.GC_BGD
    # Only the outline's bounding box goes through GrabCut: outside it nothing can change.
    rows, cols = np.flatnonzero(outer.any(1)), np.flatnonzero(outer.any(0))
    top, bottom = max(0, rows[0] - 1), min(height, rows[-1] + 2)
    left, right = max(0, cols[0] - 1), min(width, cols[-1] + 2)
    window = np.ascontiguousarray(labels[top:bottom, left:right])
    bgr = np.ascontiguousarray(picture[top:bottom, left:right, ::-1])
    cv2.setRNGSeed(0)
    cv2.grabCut(bgr, window, None, background_model, foreground_model, 1, cv2.GC_EVAL_FREEZE_MODEL)
    labels[top:bottom, left:right] = window
    return _foreground(labels)


# ------------------------------------------------------------------------------------------ border model
def _unexplained_by_border(small: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels that neither of the border's two background models explains."""
    # A light blur so that texture and JPEG noise do not read as foreground.
    blurred = ndimage.uniform_filter(small.astype(np.float32) / 255.0, size=(3, 3, 1), mode="nearest")
    features = _colour_features(blurred)
    sides = _border_sides(features.shape[:2])
    # Two background models, and a pixel is background when either explains it: a smooth colour
    # field (studio backdrops, gradients, vignetting) and a few flat colours (a table and a wall).
    distance = _distance_to_background_colours(features, sides)
    smooth = _distance_to_smooth_background(features, sides)
    if smooth is not None:
        distance = np.minimum(distance, smooth)
    return distance > max(_otsu(distance), MIN_CONTRAST)


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
    if not np.isfinite(top):
        top = float(np.max(values[np.isfinite(values)], initial=0.0))
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
