"""image_preprocessing: the foreground found, cropped, recentred; no foreground refused."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from skimage import data as samples

from services.common.errors import InvalidArgument
from services.generation.pipeline.image_preprocessing import (
    BACKGROUND_FILL,
    prepare_image,
    regularize_grid_mask,
)
from services.generation.pipeline.records import LoadedImage


def loaded(rgba: np.ndarray) -> LoadedImage:
    if rgba.ndim == 2:
        rgba = np.dstack([rgba] * 3)
    if rgba.shape[2] == 3:
        rgba = np.dstack([rgba, np.full(rgba.shape[:2], 255, np.uint8)])
    return LoadedImage(rgba=rgba, has_alpha=bool(rgba[..., 3].min() < 255), source_format="PNG",
                       size=(rgba.shape[1], rgba.shape[0]))


def prepare(rgba: np.ndarray, mode: str = "auto", ratio: float = 0.85, resolution: int = 128):
    return prepare_image(loaded(rgba), remove_background=mode, foreground_ratio=ratio, resolution=resolution)


def disk_picture(side: int = 300, radius: float = 80, centre: tuple[float, float] = (170, 130),
                 colour: tuple[int, int, int] = (230, 60, 40), background: tuple[int, int, int] = (20, 20, 20),
                 alpha: bool = False) -> np.ndarray:
    ys, xs = np.mgrid[:side, :side] + 0.5
    inside = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius**2
    rgb = np.where(inside[..., None], np.array(colour, np.uint8), np.array(background, np.uint8))
    if alpha:
        return np.dstack([rgb, inside.astype(np.uint8) * 255])
    return rgb


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def circularity_iou(mask: np.ndarray) -> float:
    """IoU of a mask with the disk of the same centroid and area."""
    ys, xs = np.nonzero(mask)
    radius = np.sqrt(mask.sum() / np.pi)
    grid_y, grid_x = np.mgrid[: mask.shape[0], : mask.shape[1]]
    disk = (grid_x - xs.mean()) ** 2 + (grid_y - ys.mean()) ** 2 < radius**2
    return (disk & mask).sum() / (disk | mask).sum()


@pytest.mark.parametrize("alpha", [True, False])
@pytest.mark.parametrize("ratio", [0.5, 0.85, 1.0])
def test_disk_is_found_centred_and_scaled_to_the_ratio(alpha: bool, ratio: float) -> None:
    prepared = prepare(disk_picture(alpha=alpha), ratio=ratio)
    assert prepared.mask_source == ("alpha" if alpha else "segmentation")
    side = prepared.rgb.shape[0]
    assert prepared.rgb.shape == (side, side, 3) and prepared.rgb.dtype == np.uint8
    assert prepared.mask.shape == (side, side) and prepared.mask.dtype == bool
    assert 256 <= side <= 1024
    top, bottom, left, right = bounding_box(prepared.mask)
    assert abs((bottom - top) / side - ratio) < 0.02
    assert abs((right - left) / side - ratio) < 0.02
    assert abs((top + bottom) / 2 - side / 2) < 2 and abs((left + right) / 2 - side / 2) < 2
    assert circularity_iou(prepared.mask) > 0.97
    # The colour inside is the disk's, the outside is the neutral fill.
    assert np.abs(prepared.rgb[side // 2, side // 2].astype(int) - (230, 60, 40)).max() < 8
    assert np.all(prepared.rgb[~prepared.mask] == BACKGROUND_FILL)


def test_grid_mask_is_the_area_resampled_mask() -> None:
    prepared = prepare(disk_picture(alpha=True), resolution=96)
    grid = prepared.grid_mask
    assert grid.shape == (96, 96) and grid.dtype == bool
    side = prepared.mask.shape[0]
    coverage = np.asarray(Image.fromarray(prepared.mask.astype(np.uint8) * 255).resize((96, 96), Image.BOX)) / 255
    assert (grid != (coverage >= 0.5)).sum() <= 4  # only the regularisation may differ
    assert abs(grid.mean() - prepared.mask.mean()) < 0.01
    assert side >= 96


def test_mode_off_without_alpha_keeps_the_whole_picture() -> None:
    picture = samples.coffee()
    prepared = prepare(picture, mode="off", ratio=1.0)
    assert prepared.mask_source == "full"
    top, bottom, left, right = bounding_box(prepared.mask)
    side = prepared.mask.shape[0]
    assert right - left >= side - 2  # the picture's long side spans the frame
    assert abs((bottom - top) / side - 400 / 600) < 0.02


def test_mode_off_uses_alpha_when_there_is_one() -> None:
    assert prepare(disk_picture(alpha=True), mode="off").mask_source == "alpha"


def test_mode_on_ignores_alpha_and_segments() -> None:
    rgba = disk_picture(alpha=False)
    rgba = np.dstack([rgba, np.full(rgba.shape[:2], 255, np.uint8)])
    rgba[:150, :, 3] = 0  # an alpha that cuts the disk in half
    assert prepare(rgba, mode="auto").mask_source == "alpha"
    segmented = prepare(rgba, mode="on")
    assert segmented.mask_source == "segmentation"
    assert circularity_iou(segmented.mask) > 0.97


def test_segmentation_of_an_object_on_a_gradient_touching_the_border() -> None:
    ys, xs = np.mgrid[:300, :400]
    picture = np.dstack([100 + xs / 8, 150 + ys / 10, 200 - xs / 10]).astype(np.uint8)
    image = Image.fromarray(picture)
    ImageDraw.Draw(image).polygon([(130, 299), (200, 60), (270, 299)], fill=(30, 30, 30))
    prepared = prepare(np.asarray(image))
    # A triangle: the mask's width grows linearly from its apex to its base.
    widths = prepared.mask.sum(1)
    rows = np.flatnonzero(widths)
    top, bottom = rows[0], rows[-1]
    quarter, three_quarters = top + (bottom - top) // 4, top + 3 * (bottom - top) // 4
    assert 2.0 < widths[three_quarters] / max(widths[quarter], 1) < 4.5
    assert prepared.mask.mean() < 0.5


def test_soft_shadow_on_a_studio_backdrop_stays_background() -> None:
    picture = Image.new("RGB", (400, 300), (235, 235, 235))
    draw = ImageDraw.Draw(picture)
    draw.ellipse([120, 230, 300, 270], fill=(205, 205, 205))  # shadow
    draw.rectangle([150, 60, 270, 250], fill=(40, 60, 200))
    prepared = prepare(np.asarray(picture), ratio=0.85)
    top, bottom, left, right = bounding_box(prepared.mask)
    assert abs((right - left) / (bottom - top) - 120 / 190) < 0.05


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "logo", "horse"])
def test_sample_photos_give_one_sensible_object(name: str) -> None:
    picture = getattr(samples, name)()
    if picture.dtype == bool:
        picture = np.where(picture, 255, 0).astype(np.uint8)  # black horse on white
    prepared = prepare(picture, resolution=256)
    share = prepared.mask.mean()
    assert 0.05 < share < 0.85, share
    assert ndimage.label(prepared.mask)[1] == 1
    assert prepared.grid_mask.sum() > 1000


def test_horse_silhouette_is_recovered() -> None:
    horse = samples.horse()  # True = background
    prepared = prepare(np.where(horse, 255, 0).astype(np.uint8), ratio=0.9)
    top, bottom, left, right = bounding_box(prepared.mask)
    expected = ~horse
    rows, cols = np.flatnonzero(expected.any(1)), np.flatnonzero(expected.any(0))
    aspect = (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)
    assert abs((right - left) / (bottom - top) - aspect) < 0.03
    crop = expected[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    resized = np.asarray(Image.fromarray(crop.astype(np.uint8) * 255).resize((right - left, bottom - top))) > 127
    found = prepared.mask[top:bottom, left:right]
    assert (found & resized).sum() / (found | resized).sum() > 0.93


NO_FOREGROUND = {
    "fully-transparent": np.zeros((200, 200, 4), np.uint8),
    "plain-white": np.full((200, 200, 3), 255, np.uint8),
    "plain-grey-with-noise": np.clip(
        128 + np.random.default_rng(0).normal(0, 3, (200, 200, 3)), 0, 255
    ).astype(np.uint8),
    "tiny-speck": disk_picture(side=400, radius=3, centre=(200, 200)),
    "tiny-alpha-speck": disk_picture(side=400, radius=3, centre=(200, 200), alpha=True),
}


@pytest.mark.parametrize("name", sorted(NO_FOREGROUND))
@pytest.mark.parametrize("mode", ["auto", "on"])
def test_no_foreground_is_a_clear_error(name: str, mode: str) -> None:
    with pytest.raises(InvalidArgument) as refusal:
        prepare(NO_FOREGROUND[name], mode=mode)
    assert str(refusal.value).startswith("image: no foreground found")


def test_thin_parts_survive_into_the_grid_mask() -> None:
    picture = np.zeros((300, 300, 4), np.uint8)
    picture[40:260, 60:240] = 255  # a block
    picture[150:152, 10:60] = 255  # a two-pixel antenna, under one grid cell thick at resolution 96
    prepared = prepare(picture, resolution=96)
    grid = prepared.grid_mask
    assert ndimage.label(grid)[1] == 1
    assert manifold_violations(grid) == 0
    # The antenna is still there, thickened, not cut off.
    columns = np.flatnonzero(grid.any(0))
    rows = np.flatnonzero(grid.any(1))
    assert (columns[-1] - columns[0] + 1) / (rows[-1] - rows[0] + 1) > 1.0  # 230 / 220 with it, 180 / 220 without


# ---------------------------------------------------------------------------------------------
# Grid-mask regularisation


def random_blobs(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=rng.uniform(1.0, 3.0))
    return noise > np.quantile(noise, rng.uniform(0.3, 0.7))


def manifold_violations(cells: np.ndarray) -> int:
    blocks = cells[:-1, :-1] & cells[:-1, 1:] & cells[1:, :-1] & cells[1:, 1:]
    count = 0
    for grid, full in ((cells, blocks), (cells.T, blocks.T)):
        pairs = grid[:, :-1] & grid[:, 1:]
        above = np.zeros_like(pairs)
        above[1:] = full
        below = np.zeros_like(pairs)
        below[:-1] = full
        count += int((pairs & ~above & ~below).sum())
    a, b, c, d = cells[:-1, :-1], cells[:-1, 1:], cells[1:, :-1], cells[1:, 1:]
    count += int(((a & d & ~b & ~c) | (b & c & ~a & ~d)).sum())
    return count


@pytest.mark.parametrize("seed", range(12))
def test_regularised_masks_are_one_piece_without_thin_parts_or_corner_contacts(seed: int) -> None:
    raw = random_blobs(seed)
    cells = regularize_grid_mask(raw)
    assert cells.any()
    assert manifold_violations(raw) > 0 or seed > 6  # the random masks do exercise the repairs
    assert manifold_violations(cells) == 0
    assert ndimage.label(cells)[1] == 1
    assert np.array_equal(regularize_grid_mask(cells), cells)  # idempotent
    labels, _ = ndimage.label(raw)
    largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    assert np.all(cells[largest])  # cells are only added: no limb is cut off
    assert (cells & ~raw).sum() < 0.1 * largest.sum()  # small repairs, not a different shape


def test_regularisation_leaves_a_clean_shape_alone() -> None:
    ys, xs = np.mgrid[:64, :64] + 0.5
    disk = (xs - 32) ** 2 + (ys - 32) ** 2 < 20**2
    assert np.array_equal(regularize_grid_mask(disk), disk)


@pytest.mark.parametrize("seed", range(6))
def test_component_and_hole_helpers_match_scipy_on_random_masks(seed: int) -> None:
    """OpenCV does the labelling and hole filling: the same masks as scipy.ndimage's 4-connected ones."""
    from services.generation.pipeline.background_removal import fill_holes, largest_component

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.normal(size=(97, 130)), 2.0) > rng.uniform(-0.2, 0.3)
    labels, count = ndimage.label(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    expected = labels == int(np.argmax(sizes)) if count > 1 else mask
    assert np.array_equal(largest_component(mask), expected)
    assert np.array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
