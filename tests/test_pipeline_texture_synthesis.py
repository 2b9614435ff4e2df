"""texture_synthesis: the picture projected on the front, a plausible back, no background bleeding."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from services.generation.backends import get_backend
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.records import LoadedImage, PreparedImage, Shape
from services.generation.pipeline.texture_synthesis import (
    EXTRAS_ATLAS,
    atlas_uv,
    push_pull_fill,
    sample_atlas,
    synthesize_texture,
)

RED, BLUE, GREEN = (220, 30, 30), (30, 40, 220), (20, 200, 20)


def two_colour_disk() -> PreparedImage:
    """A disk, red on its left half and blue on its right, on a green background with a real alpha mask."""
    side = 320
    ys, xs = np.mgrid[:side, :side] + 0.5
    inside = (xs - 160) ** 2 + (ys - 160) ** 2 < 120**2
    rgb = np.where((xs < 160)[..., None], np.array(RED, np.uint8), np.array(BLUE, np.uint8))
    rgb[~inside] = GREEN
    rgba = np.dstack([rgb, inside.astype(np.uint8) * 255])
    loaded = LoadedImage(rgba=rgba, has_alpha=True, source_format="PNG", size=(side, side))
    return prepare_image(loaded, remove_background="auto", foreground_ratio=0.85, resolution=128)


@pytest.fixture(scope="module")
def disk_inputs() -> tuple[Shape, PreparedImage]:
    prepared = two_colour_disk()
    (shape,) = get_backend("inflate").generate([prepared.grid_mask], steps=50, device=torch.device("cpu"))
    return shape, prepared


def test_front_is_the_picture_projected_along_z(disk_inputs: tuple[Shape, PreparedImage]) -> None:
    shape, prepared = disk_inputs
    textured = synthesize_texture(shape, prepared, texture=True, texture_size=512, seed=0)
    assert textured.texture is not None and textured.texture.shape == (512, 512, 3)
    assert textured.texture.dtype == np.uint8
    colours = textured.vertex_colors.astype(int)
    x, z = shape.vertices[:, 0], shape.vertices[:, 2]
    # Away from the rim, whose last pixels are filled from further in.
    front_left = (z > 0.1) & (x < -0.05)
    front_right = (z > 0.1) & (x > 0.05)
    assert np.abs(colours[front_left, :3] - RED).max() < 20
    assert np.abs(colours[front_right, :3] - BLUE).max() < 20


def test_back_is_the_mirrored_front_darker(disk_inputs: tuple[Shape, PreparedImage]) -> None:
    shape, prepared = disk_inputs
    textured = synthesize_texture(shape, prepared, texture=True, texture_size=512, seed=0)
    colours = textured.vertex_colors.astype(float)
    x, z = shape.vertices[:, 0], shape.vertices[:, 2]
    back_left = (z < -0.05) & (x < -0.1)  # seen from behind this is on the viewer's right: mirrored
    front_left = (z > 0.05) & (x < -0.1)
    assert colours[back_left, 0].mean() > colours[back_left, 2].mean() + 80  # still red
    assert colours[back_left, 0].mean() < colours[front_left, 0].mean() * 0.95  # darker


def test_no_background_colour_reaches_the_atlas(disk_inputs: tuple[Shape, PreparedImage]) -> None:
    shape, prepared = disk_inputs
    atlas = synthesize_texture(shape, prepared, texture=True, texture_size=1024, seed=0).texture
    assert atlas is not None
    # Anything green-dominant would be the background bleeding in; the fill extends red and blue only.
    greenish = (atlas[..., 1].astype(int) > atlas[..., 0] + 30) & (atlas[..., 1].astype(int) > atlas[..., 2] + 30)
    assert not greenish.any()
    # The grey the preprocessing filled the background with does not bleed either.
    greyish = (np.ptp(atlas.astype(int), axis=2) < 30) & (atlas.mean(axis=2) > 60)
    assert greyish.mean() < 0.001


def test_texture_off_keeps_vertex_colours_only(disk_inputs: tuple[Shape, PreparedImage]) -> None:
    shape, prepared = disk_inputs
    textured = synthesize_texture(shape, prepared, texture=False, texture_size=1024, seed=0)
    assert textured.texture is None
    assert textured.vertex_colors.shape == (len(shape.vertices), 4)
    assert textured.vertex_colors.dtype == np.uint8
    assert np.all(textured.vertex_colors[:, 3] == 255)
    on = synthesize_texture(shape, prepared, texture=True, texture_size=1024, seed=0)
    assert np.abs(textured.vertex_colors.astype(int) - on.vertex_colors).mean() < 6
    assert isinstance(textured.extras[EXTRAS_ATLAS], np.ndarray)


def test_output_is_deterministic(disk_inputs: tuple[Shape, PreparedImage]) -> None:
    shape, prepared = disk_inputs
    first = synthesize_texture(shape, prepared, texture=True, texture_size=256, seed=7)
    second = synthesize_texture(shape, prepared, texture=True, texture_size=256, seed=7)
    assert first.texture is not None and second.texture is not None
    assert np.array_equal(first.texture, second.texture)
    assert np.array_equal(first.vertex_colors, second.vertex_colors)


def test_atlas_mapping_keeps_front_and_back_in_their_halves() -> None:
    corners = np.array([[-0.5, 0.5], [0.5, -0.5], [0.0, 0.0]], np.float32)
    front = atlas_uv(corners, np.zeros(3, bool), 1024)
    back = atlas_uv(corners, np.ones(3, bool), 1024)
    assert np.all((front[:, 0] > 0) & (front[:, 0] < 0.5)) and np.all((back[:, 0] > 0.5) & (back[:, 0] < 1))
    assert np.allclose(back[:, 0] - front[:, 0], 0.5)
    assert front[0, 1] < front[1, 1]  # glTF: v grows downward, so the top (y = 0.5) has the smaller v
    assert np.allclose(front[2], [0.25, 0.5], atol=1e-6)


def test_sampling_reads_the_texel_under_the_coordinate() -> None:
    atlas = np.zeros((4, 4, 3), np.uint8)
    atlas[1, 2] = (200, 100, 50)
    colours = sample_atlas(atlas, np.array([[2.5 / 4, 1.5 / 4]], np.float32))
    assert tuple(colours[0]) == (200, 100, 50, 255)


def test_sampling_many_points_reads_each_texel_and_blends_between() -> None:
    """More points than one row of OpenCV's sampling map holds, in order, texel centres exact."""
    rng = np.random.default_rng(0)
    atlas = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rows, cols = rng.integers(0, 64, 70_000), rng.integers(0, 64, 70_000)
    centres = np.stack([(cols + 0.5) / 64, (rows + 0.5) / 64], 1).astype(np.float32)
    colours = sample_atlas(atlas, centres)
    assert colours.shape == (70_000, 4) and np.all(colours[:, 3] == 255)
    assert np.array_equal(colours[:, :3], atlas[rows, cols])
    between = sample_atlas(atlas, np.array([[1.0 / 64, 0.5 / 64]], np.float32))  # halfway from texel 0 to 1
    assert np.abs(between[0, :3].astype(int) - (atlas[0, 0].astype(int) + atlas[0, 1]) / 2).max() <= 1


def test_push_pull_fills_gaps_from_the_nearest_known_colours() -> None:
    colours = np.zeros((64, 64, 3), np.float32)
    known = np.zeros((64, 64), bool)
    colours[:, :8], known[:, :8] = (255, 0, 0), True
    colours[:, -8:], known[:, -8:] = (0, 0, 255), True
    filled = push_pull_fill(colours, known)
    assert np.array_equal(filled[known], colours[known])
    assert filled[32, 10, 0] > 200 and filled[32, 53, 2] > 200  # next to each side, its colour
    assert np.all(filled.sum(axis=2) > 200)  # nothing left black


def test_edge_pixels_mixed_with_the_background_are_not_trusted() -> None:
    """A soft-edged object on green: the rim pixels are part green; none of that reaches the atlas."""
    from scipy import ndimage

    side = 320
    ys, xs = np.mgrid[:side, :side] + 0.5
    coverage = ndimage.gaussian_filter(((xs - 160) ** 2 + (ys - 160) ** 2 < 110**2).astype(float), 2.0)
    rgb = (coverage[..., None] * np.array(RED) + (1 - coverage[..., None]) * np.array(GREEN)).astype(np.uint8)
    loaded = LoadedImage(rgba=np.dstack([rgb, np.full((side, side), 255, np.uint8)]), has_alpha=False,
                         source_format="PNG", size=(side, side))
    prepared = prepare_image(loaded, remove_background="auto", foreground_ratio=0.85, resolution=128)
    (shape,) = get_backend("inflate").generate([prepared.grid_mask], steps=50, device=torch.device("cpu"))
    textured = synthesize_texture(shape, prepared, texture=True, texture_size=512, seed=0)
    assert textured.texture is not None
    assert textured.texture[..., 1].max() < RED[1] + 25
    assert textured.vertex_colors[:, 1].max() < RED[1] + 25
