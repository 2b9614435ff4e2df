"""The inflate backend: accurate Poisson heights, closed outward meshes, batch invariance, memory model."""
from __future__ import annotations

import time
import tracemalloc
import weakref
from itertools import pairwise

import numpy as np
import pytest
import scipy.sparse.linalg as sparse_linalg
import torch
import trimesh
from scipy import ndimage, sparse
from skimage import data as samples
from skimage.transform import resize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from services.common.errors import Cancelled, InvalidArgument, ResourceExhausted
from services.generation.backends import ShapeBackend, get_backend, inflate
from services.generation.backends.base import ShapeItem, ShapeSettings, check_fits, free_memory_bytes
from services.generation.backends.inflate import (
    InflateBackend,
    build_mesh,
    solve_poisson,
)
from services.generation.pipeline.image_preprocessing import regularize_grid_mask
from services.generation.pipeline.mesh_export import is_closed
from services.generation.pipeline.records import PreparedImage

CPU = torch.device("cpu")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def disk_mask(resolution: int = 256, radius_share: float = 0.425, centre: tuple[float, float] | None = None) -> np.ndarray:
    ys, xs = np.mgrid[:resolution, :resolution] + 0.5
    cx, cy = centre or (resolution / 2, resolution / 2)
    return (xs - cx) ** 2 + (ys - cy) ** 2 < (radius_share * resolution) ** 2


def horse_mask(resolution: int = 256) -> np.ndarray:
    horse = ~samples.horse()
    square = np.zeros((400, 400), bool)
    square[36:364, :] = horse
    return resize(square.astype(float), (resolution, resolution), anti_aliasing=True) > 0.5


def blob_mask(seed: int, resolution: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(resolution, resolution)), sigma=rng.uniform(2.0, 5.0))
    mask = noise > np.quantile(noise, rng.uniform(0.4, 0.7))
    mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
    return mask


def as_trimesh(shape) -> trimesh.Trimesh:
    return trimesh.Trimesh(shape.vertices, shape.faces, process=False)


def direct_solution(cells: np.ndarray) -> np.ndarray:
    """u on the corner grid by a sparse direct solve: the reference for the iterative solver."""
    padded = np.pad(cells, 1)
    interior = padded[:-1, :-1] & padded[:-1, 1:] & padded[1:, :-1] & padded[1:, 1:]
    index = -np.ones(interior.shape, int)
    count = int(interior.sum())
    index[interior] = np.arange(count)
    rows, cols = np.nonzero(interior)
    entries = [(index[rows, cols], index[rows, cols], np.full(count, 4.0))]
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = index[rows + dr, cols + dc]
        ok = neighbour >= 0
        entries.append((index[rows, cols][ok], neighbour[ok], -np.ones(ok.sum())))
    r, c, v = (np.concatenate(part) for part in zip(*entries))
    matrix = sparse.csc_matrix((v, (r, c)), shape=(count, count))
    solution = np.zeros(interior.shape)
    solution[interior] = sparse_linalg.spsolve(matrix, np.ones(count))
    return solution


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_returns_the_one_inflate_backend() -> None:
    backend = get_backend("inflate")
    assert isinstance(backend, InflateBackend) and isinstance(backend, ShapeBackend)
    assert backend is get_backend("inflate")
    assert backend.name == "inflate"


def test_unknown_backend_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as refusal:
        get_backend("nerf")
    assert refusal.value.field == "backend" and "nerf" in str(refusal.value)


# ---------------------------------------------------------------------------------------------
# Solver


@pytest.mark.parametrize("resolution", [256, 300])
def test_solver_matches_a_direct_solve_at_default_steps(resolution: int) -> None:
    cells = regularize_grid_mask(horse_mask(resolution))
    padded = inflate._padded_cells(resolution)
    batch = np.zeros((1, padded, padded), bool)
    batch[0, :resolution, :resolution] = cells
    solved = solve_poisson(torch.from_numpy(batch).to(DEVICE), max_iterations=50)[0].cpu().numpy()
    solved = solved[: resolution + 1, : resolution + 1]
    reference = direct_solution(cells)
    heights, expected = np.sqrt(np.maximum(solved, 0)), np.sqrt(reference)
    assert np.abs(heights - expected).max() < 1e-3 * expected.max()


def test_disk_potential_is_the_analytic_paraboloid() -> None:
    radius = 0.425 * 256
    cells = disk_mask()
    solved = solve_poisson(torch.from_numpy(cells)[None], max_iterations=50)[0].numpy()
    # u = (R^2 - r^2) / 4 in pixel units; the discrete outline moves R by under a pixel.
    assert abs(solved.max() - radius**2 / 4) < 0.02 * radius**2 / 4


def test_more_steps_never_hurt_and_one_step_is_rough() -> None:
    cells = torch.from_numpy(regularize_grid_mask(horse_mask(128)))[None]
    reference = direct_solution(cells[0].numpy())
    errors = {}
    for steps in (1, 3, 50, 200):
        solved = solve_poisson(cells, max_iterations=steps)[0].numpy()
        errors[steps] = np.abs(solved - reference).max() / reference.max()
    assert errors[1] > 1e-2
    assert errors[1] > errors[3] > errors[50]
    assert errors[200] <= errors[50] + 1e-6  # converged: later iterations are frozen


# ---------------------------------------------------------------------------------------------
# Mesh


def test_disk_inflates_to_a_sphere() -> None:
    (shape,) = get_backend("inflate").generate([disk_mask()], steps=50, device=DEVICE)
    mesh = as_trimesh(shape)
    assert mesh.is_watertight and mesh.is_winding_consistent
    width, height, depth = mesh.extents
    assert abs(width - 0.85) < 0.01 and abs(height - 0.85) < 0.01
    assert abs(depth / width - 1) < 0.02
    assert abs(mesh.volume / np.prod(mesh.extents) - np.pi / 6) < 0.02 * np.pi / 6


def test_frame_is_the_shared_one() -> None:
    mask = np.zeros((128, 128), bool)
    mask[10:40, 70:120] = True  # a block in the top right of the picture
    (shape,) = get_backend("inflate").generate([mask], steps=50, device=DEVICE)
    assert shape.vertices.dtype == np.float32 and shape.faces.dtype == np.int64
    x, y, z = shape.vertices.T
    assert 70 / 128 - 0.5 - 0.01 < x.min() and x.max() < 120 / 128 - 0.5 + 0.01  # right of centre
    assert 0.5 - 40 / 128 - 0.01 < y.min() and y.max() < 0.5 - 10 / 128 + 0.01  # above centre (y up)
    assert z.max() > 0 and z.max() == -z.min()  # front toward +z, back mirrored
    assert as_trimesh(shape).volume > 0  # outward normals


@pytest.mark.parametrize("seed", range(8))
def test_random_silhouettes_give_closed_one_piece_manifolds(seed: int) -> None:
    mask = blob_mask(seed)
    (shape,) = get_backend("inflate").generate([mask], steps=50, device=DEVICE)
    cells = regularize_grid_mask(mask)
    mesh = as_trimesh(shape)
    assert is_closed(shape.faces)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.body_count == 1
    assert mesh.volume > 0
    # A closed orientable surface of genus g has Euler characteristic 2 - 2g, g = the silhouette's holes.
    _, count = ndimage.label(~np.pad(cells, 1))
    holes = count - 1
    assert mesh.euler_number == 2 - 2 * holes
    # Every vertex used, no face twice.
    assert np.unique(shape.faces).size == len(shape.vertices)
    assert len(np.unique(np.sort(shape.faces, axis=1), axis=0)) == len(shape.faces)


def test_outline_is_smoothed_not_stair_stepped(monkeypatch: pytest.MonkeyPatch) -> None:
    def stair_roughness(shape) -> float:
        """The rim's radius, in cells, less its running mean over 9 neighbours: the zig-zag of the stairs."""
        rim = shape.vertices[shape.vertices[:, 2] == 0].astype(np.float64)
        radii = np.hypot(rim[:, 0], rim[:, 1])[np.argsort(np.arctan2(rim[:, 1], rim[:, 0]))] * 128
        return float((radii - ndimage.uniform_filter1d(radii, 9, mode="wrap")).std())

    cells = disk_mask(128)
    potential = solve_poisson(torch.from_numpy(cells)[None], max_iterations=50)[0].numpy()
    smoothed = stair_roughness(build_mesh(cells, potential))
    monkeypatch.setattr(inflate, "OUTLINE_ROUNDS", 0)
    raw = stair_roughness(build_mesh(cells, potential))
    assert raw > 0.25  # grid corners on a stair-stepped circle
    assert smoothed < 0.4 * raw
    # Taubin does not shrink: the mean radius stays put.
    (shape,) = get_backend("inflate").generate([cells], steps=50, device=DEVICE)
    rim = shape.vertices[shape.vertices[:, 2] == 0]
    assert abs(np.hypot(rim[:, 0], rim[:, 1]).mean() - 0.425) < 0.1 / 128


def solved(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(regularised cells, u on their corners) of a mask whose side is a multiple of 16."""
    cells = regularize_grid_mask(mask)
    potential = solve_poisson(torch.from_numpy(cells)[None], max_iterations=50)[0].numpy()
    return cells, potential


@pytest.mark.parametrize(("name", "budget"), [("disk", 8000), ("horse", 20000), ("blob", 40000)])
def test_a_face_budget_is_met_by_a_closed_mesh_close_to_the_full_one(name: str, budget: int) -> None:
    mask = {"disk": disk_mask(), "horse": horse_mask(), "blob": blob_mask(3, 256)}[name]
    cells, potential = solved(mask)
    full = build_mesh(cells, potential)
    budgeted = build_mesh(cells, potential, face_budget=budget)
    assert len(full.faces) > budget and 0.9 * budget <= len(budgeted.faces) <= budget
    assert budgeted.checked_closed and is_closed(budgeted.faces)
    mesh, reference = as_trimesh(budgeted), as_trimesh(full)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.body_count == 1
    assert np.unique(budgeted.faces).size == len(budgeted.vertices)
    assert abs(mesh.volume / reference.volume - 1) < 0.01
    # The outline (z = 0) is kept vertex for vertex, and the back still mirrors the front.
    rim = {tuple(v) for v in full.vertices[full.vertices[:, 2] == 0]}
    assert {tuple(v) for v in budgeted.vertices[budgeted.vertices[:, 2] == 0]} == rim
    front, back = budgeted.vertices[budgeted.vertices[:, 2] > 0], budgeted.vertices[budgeted.vertices[:, 2] < 0]
    assert np.array_equal(np.sort(front * [1, 1, -1], axis=0), np.sort(back, axis=0))


def test_a_budget_the_full_mesh_fits_or_its_outline_crowds_changes_nothing() -> None:
    cells, potential = solved(disk_mask(128))
    full = build_mesh(cells, potential)
    same = build_mesh(cells, potential, face_budget=len(full.faces))
    assert np.array_equal(same.vertices, full.vertices) and np.array_equal(same.faces, full.faces)
    # A long outline under a tight budget would leave the inside few faces: mesh_export decimates it all.
    cells, potential = solved(blob_mask(3, 256))
    crowded = build_mesh(cells, potential, face_budget=8000)
    assert np.array_equal(crowded.faces, build_mesh(cells, potential).faces) and not crowded.checked_closed


@pytest.mark.parametrize("name", ["disk", "horse", "blob"])
def test_block_sheet_tiles_the_silhouette_edge_to_edge(name: str) -> None:
    """The front sheet with 2 x 2 blocks made fans covers exactly the cells, every triangle counter-clockwise,
    and mirrors into a closed mesh: no vertex on another triangle's edge."""
    mask = {"disk": disk_mask(), "horse": horse_mask(), "blob": blob_mask(3, 97)}[name]
    cells = regularize_grid_mask(mask)
    padded = np.pad(cells, 1)
    interior = padded[:-1, :-1] & padded[:-1, 1:] & padded[1:, :-1] & padded[1:, 1:]
    used = padded[:-1, :-1] | padded[:-1, 1:] | padded[1:, :-1] | padded[1:, 1:]
    index = np.full(used.shape, -1, np.int64)
    index[used] = np.arange(used.sum())
    rows, cols = np.nonzero(used)
    faces = inflate._block_triangles(cells, interior, index)
    assert len(faces) < len(inflate._triangles(cells, interior, index))
    a, b, c = (np.stack([cols, -rows], 1)[faces[:, k]].astype(float) for k in range(3))
    areas = ((b - a)[:, 0] * (c - a)[:, 1] - (b - a)[:, 1] * (c - a)[:, 0]) / 2
    assert areas.min() > 0 and areas.sum() == cells.sum()
    vertices = np.stack([cols, -rows, np.ones(len(rows))], 1).astype(float)
    assert is_closed(inflate._mirrored(vertices, faces, interior[rows, cols]).faces)


def test_each_budgeted_item_is_bit_identical_alone_or_in_a_batch() -> None:
    masks = [disk_mask(), horse_mask(), blob_mask(3, 256)]
    budgets = [8000, 20000, 40000]

    def item(mask: np.ndarray, budget: int) -> ShapeItem:
        image = PreparedImage(rgb=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8), bool), grid_mask=mask,
                              mask_source="alpha", source_mask=np.ones((8, 8), bool))
        return ShapeItem(image, 0, budget)

    backend, settings = get_backend("inflate"), ShapeSettings(256, 50, 0.0)
    alone = [backend.generate_batch([item(m, b)], settings, device=DEVICE)[0] for m, b in zip(masks, budgets)]
    together = backend.generate_batch([item(m, b) for m, b in zip(masks, budgets)], settings, device=DEVICE)
    for one, other, budget in zip(alone, together, budgets):
        assert len(one.faces) <= budget
        assert np.array_equal(one.vertices, other.vertices) and np.array_equal(one.faces, other.faces)


def test_specks_are_dropped_and_thin_parts_kept() -> None:
    mask = disk_mask(128, 0.3)
    mask[5:7, 5:7] = True  # a speck
    mask[63, 100:125] = True  # a one-cell-thick antenna
    (shape,) = get_backend("inflate").generate([mask], steps=50, device=DEVICE)
    mesh = as_trimesh(shape)
    assert mesh.body_count == 1 and mesh.is_watertight
    assert shape.vertices[:, 0].max() > 124 / 128 - 0.5 - 0.02
    assert shape.vertices[:, 0].min() > -0.35


@pytest.mark.parametrize("resolution", [64, 100, 257])
def test_any_resolution_in_range(resolution: int) -> None:
    (shape,) = get_backend("inflate").generate([disk_mask(resolution, 0.4)], steps=50, device=DEVICE)
    mesh = as_trimesh(shape)
    assert mesh.is_watertight
    assert abs(mesh.extents[2] / mesh.extents[0] - 1) < 0.05


def test_silhouette_too_thin_for_a_solid_is_refused() -> None:
    mask = np.zeros((64, 64), bool)
    mask[30, 30] = True
    with pytest.raises(InvalidArgument, match="^image: no foreground"):
        get_backend("inflate").generate([mask], steps=50, device=DEVICE)


# ---------------------------------------------------------------------------------------------
# Batching, progress, cancellation


def test_each_item_is_bit_identical_alone_or_in_a_mixed_batch() -> None:
    masks = [disk_mask(), horse_mask(), blob_mask(3, 256), disk_mask(256, 0.2, centre=(60, 200))]
    backend = get_backend("inflate")
    alone = [backend.generate([mask], steps=50, device=DEVICE)[0] for mask in masks]
    order = [2, 0, 3, 1, 0]
    together = backend.generate([masks[i] for i in order], steps=50, device=DEVICE)
    for index, shape in zip(order, together):
        assert np.array_equal(shape.vertices, alone[index].vertices)
        assert np.array_equal(shape.faces, alone[index].faces)
    # Few steps, so items stop at the cap rather than at convergence: still identical.
    rough_alone = backend.generate([masks[1]], steps=2, device=DEVICE)[0]
    rough_batch = backend.generate([masks[0], masks[1]], steps=2, device=DEVICE)[1]
    assert np.array_equal(rough_alone.vertices, rough_batch.vertices)


def test_masks_of_different_sizes_are_rejected() -> None:
    with pytest.raises(ValueError):
        get_backend("inflate").generate([disk_mask(64), disk_mask(96)], steps=10, device=DEVICE)


def test_progress_rises_to_one() -> None:
    fractions: list[float] = []
    get_backend("inflate").generate([horse_mask(128), disk_mask(128)], steps=50, device=DEVICE,
                                    progress=fractions.append)
    assert len(fractions) >= 3
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


def test_should_stop_cancels_between_chunks() -> None:
    polls = []

    def stop_on_third_poll() -> bool:
        polls.append(1)
        return len(polls) >= 3

    with pytest.raises(Cancelled, match="cancelled"):
        get_backend("inflate").generate([horse_mask(128)], steps=500, device=DEVICE,
                                        should_stop=stop_on_third_poll)
    assert len(polls) == 3


# ---------------------------------------------------------------------------------------------
# Memory


class PeakTensorBytes(TorchDispatchMode):
    """Live bytes of the tensor storages torch ops create, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.references: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int) -> None:
        self.references[key] -= 1
        if self.references[key] == 0:
            self.current -= self.sizes.pop(key)
            del self.references[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.references:
                    self.references[key] = 0
                    self.sizes[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    self.peak = max(self.peak, self.current)
                self.references[key] += 1
                weakref.finalize(tensor, self._release, key)
        return out


def test_memory_model_matches_a_measurement() -> None:
    resolution, batch = 256, 2
    masks = [disk_mask(resolution, 0.47), disk_mask(resolution, 0.45)]
    backend = get_backend("inflate")
    with PeakTensorBytes() as tensors:
        padded = inflate._padded_cells(resolution)
        cells = np.zeros((batch, padded, padded), bool)
        for index, mask in enumerate(masks):
            cells[index, :resolution, :resolution] = regularize_grid_mask(mask)
        potential = solve_poisson(torch.from_numpy(cells), max_iterations=50).numpy()
    tracemalloc.start()
    shapes = [build_mesh(cells[i, :resolution, :resolution], potential[i, : resolution + 1, : resolution + 1])
              for i in range(batch)]
    _, mesh_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(shapes) == batch
    measured_per_item = (tensors.peak + mesh_peak) / batch
    modelled = backend.estimate_item_bytes(resolution, 50)
    assert 1.0 <= modelled / measured_per_item <= 3.0, (modelled, tensors.peak, mesh_peak)
    # Grows with the grid's area.
    assert 3.5 < backend.estimate_item_bytes(512, 50) / modelled < 4.5


def test_a_picture_that_cannot_fit_is_resource_exhausted() -> None:
    item = get_backend("inflate").estimate_item_bytes(128, 50)
    with pytest.raises(ResourceExhausted, match="MiB"):
        check_fits(1, item, item // 2, "cpu")
    # A batch that only fits split up is a MemoryError, which callers split on.
    with pytest.raises(MemoryError, match="out of memory"):
        check_fits(2, item, int(item * 1.5), "cpu")
    check_fits(1, item, int(item * 1.5), "cpu")
    # The backend asks before it solves: with this machine's real free memory, one picture fits.
    assert len(get_backend("inflate").generate([disk_mask(128)], steps=50, device=CPU)) == 1
    assert free_memory_bytes(CPU) > item


def test_the_service_hears_of_progress_at_most_every_interval() -> None:
    # Each report becomes a committed, streamed event: a solve of many short chunks must not make hundreds.
    image = PreparedImage(rgb=np.zeros((8, 8, 3), np.uint8), mask=np.ones((8, 8), bool), grid_mask=disk_mask(256),
                          mask_source="alpha", source_mask=np.ones((8, 8), bool))
    reports: list[tuple[float, float]] = []
    get_backend("inflate").generate_batch(
        [ShapeItem(image, 0, 40000)], ShapeSettings(256, 400, 0.0), device=DEVICE,
        progress=lambda fraction, _detail: reports.append((time.perf_counter(), fraction)),
    )
    assert reports, "no progress at all"
    gaps = [later - earlier for (earlier, _), (later, _) in pairwise(reports)]
    assert all(gap >= inflate.PROGRESS_INTERVAL_S for gap in gaps), gaps
    assert [fraction for _, fraction in reports] == sorted(fraction for _, fraction in reports)
