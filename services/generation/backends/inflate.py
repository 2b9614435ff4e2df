"""The `inflate` backend: a silhouette blown up into a smooth closed solid.

Height field: solve the Poisson equation -lap(u) = 1 inside the silhouette
with u = 0 on its outline, then put the front surface at +2*sqrt(u) and the
back at -2*sqrt(u) (pixel units), which turns a disk of radius r into a
sphere of radius r: u = (r^2 - |x|^2) / 4 there.

Solver: conjugate gradients preconditioned by one geometric multigrid
V-cycle (damped Jacobi smoothing, full-weighting restriction, bilinear
prolongation), on the grid of cell corners, batched as (B, N, N) tensors.
It reaches a relative residual of 1e-5 in 6 to 14 iterations from 64 to
1024 cells a side, so `steps` (the iteration cap at the finest level) at
its default of 50 always converges; items that have converged stop moving.

Batch invariance: every step is either elementwise with plain +, -, *, /
(no fused multiply-add kernels, whose vector and scalar paths round
differently and whose split points move with the batch size) or a
reduction done per item on that item's own contiguous slice. An item's
result is therefore bit-identical alone or in any batch.

Mesh: vertices at the cell corners of the (regularised) grid mask; corners
on the outline are shared by the front and back surfaces at z = 0, so the
surface closes; two triangles per cell on the front, the mirrored pair on
the back; the outline is then smoothed in xy (Taubin), which moves no
vertex off z = 0 and changes no connectivity.
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from services.common.errors import InvalidArgument, ServiceError
from services.generation.backends.base import (
    BatchTimings,
    ProgressCallback,
    ShapeBackend,
    ShapeItem,
    ShapeSettings,
    StopCheck,
    check_stop,
    ensure_memory_fits,
)
from services.generation.pipeline.image_preprocessing import (
    MIN_GRID_CELLS,
    regularize_grid_mask,
)
from services.generation.pipeline.records import Shape

# Stop iterating once ||r|| <= RELATIVE_TOLERANCE * ||b||; below that float32 rounding dominates.
RELATIVE_TOLERANCE = 1e-5
# The coarsest multigrid level has about this many cells a side.
COARSEST_CELLS = 8
SMOOTHING_SWEEPS = 2  # damped-Jacobi sweeps before and after each coarse correction
COARSEST_SWEEPS = 30
JACOBI_DAMPING = 0.8
# Iterations between progress reports and stop checks.
CHUNK_ITERATIONS = 2
# Share of the progress bar for the solve; mesh building takes the rest.
SOLVE_SHARE = 0.8
# Taubin smoothing of the outline: (lambda, mu) pairs.
OUTLINE_ROUNDS = 12
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53

# Peak memory model, per batch item. Solver: float32 tensors of the finest corner grid alive at the
# peak, all levels together (u, r, z, p, Ap, the masks, the V-cycle's correction, residual and
# stencil results; measured 11.6). Mesh: bytes per grid cell while one item's mesh is built and
# kept (corner maps, positions, 4 triangles x 3 int64 per cell and their temporaries; measured
# about 340 per inside cell).
_SOLVER_TENSORS = 13
_MESH_BYTES_PER_CELL = 400


class InflateBackend(ShapeBackend):
    name = "inflate"

    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        padded = _padded_cells(resolution)
        solver = _SOLVER_TENSORS * (padded + 1) ** 2 * 4  # float32
        mesh = _MESH_BYTES_PER_CELL * resolution**2
        return int(solver + mesh)

    def generate_batch(
        self,
        items: list[ShapeItem],
        settings: ShapeSettings,
        *,
        device: torch.device,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        timings: BatchTimings | None = None,
    ) -> list[Shape | ServiceError]:
        """The batch interface over `generate`: a silhouette too thin to build fails alone."""
        if not items:
            return []
        masks = [item.image.grid_mask for item in items]
        _check_masks(masks)
        cells = [regularize_grid_mask(mask) for mask in masks]
        results: list[Shape | ServiceError] = [_too_thin() for _ in items]
        solvable = [index for index, item in enumerate(cells) if item.sum() >= MIN_GRID_CELLS]
        if not solvable:
            return results
        ensure_memory_fits(len(solvable), self.estimate_item_bytes(masks[0].shape[0], settings.steps), device)
        check_stop(should_stop)
        measured: dict[str, float] = {}

        def fraction_done(fraction: float) -> None:
            if progress is not None:
                progress(fraction, "solving" if fraction < SOLVE_SHARE else "building meshes")

        shapes = _solve_and_build([cells[i] for i in solvable], settings.steps, device, fraction_done, should_stop,
                                  measured)
        for index, shape in zip(solvable, shapes):
            results[index] = shape
        if timings is not None:
            timings.substages.update(measured)
        return results

    def generate(
        self,
        grid_masks: list[np.ndarray],
        *,
        steps: int,
        device: torch.device,
        progress: Callable[[float], None] | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[Shape]:
        """One Shape per (R, R) grid mask, in order; any mask too thin to build fails the call."""
        if not grid_masks:
            return []
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        _check_masks(grid_masks)
        resolution = grid_masks[0].shape[0]
        ensure_memory_fits(len(grid_masks), self.estimate_item_bytes(resolution, steps), device)
        check_stop(should_stop)

        cells = [regularize_grid_mask(mask) for mask in grid_masks]
        for item in cells:
            if item.sum() < MIN_GRID_CELLS:
                raise _too_thin()
        return _solve_and_build(cells, steps, device, progress, should_stop, {})


def _too_thin() -> InvalidArgument:
    return InvalidArgument("image", "no foreground found: the silhouette is too thin to build a solid")


def _check_masks(grid_masks: list[np.ndarray]) -> None:
    resolution = grid_masks[0].shape[0]
    for mask in grid_masks:
        if mask.ndim != 2 or mask.shape != (resolution, resolution):
            raise ValueError(f"grid masks must all be ({resolution}, {resolution}), got {mask.shape}")


def _solve_and_build(
    cells: list[np.ndarray],
    steps: int,
    device: torch.device,
    progress: Callable[[float], None] | None,
    should_stop: StopCheck | None,
    timings: dict[str, float],
) -> list[Shape]:
    """Solve every regularised cell mask in one batch, then build each one's mesh."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    resolution = cells[0].shape[0]
    started = time.perf_counter()
    padded = _padded_cells(resolution)
    batch = np.zeros((len(cells), padded, padded), bool)
    for index, item in enumerate(cells):
        batch[index, :resolution, :resolution] = item
    with _cpu_threads(device):
        potential = solve_poisson(
            torch.from_numpy(batch).to(device),
            max_iterations=steps,
            progress=lambda fraction: _report(progress, fraction * SOLVE_SHARE),
            should_stop=should_stop,
        )
        corner_potential = potential[:, : resolution + 1, : resolution + 1].cpu().numpy()
    del potential
    timings["solve"] = time.perf_counter() - started

    started = time.perf_counter()
    shapes = []
    for index, item in enumerate(cells):
        check_stop(should_stop)
        shapes.append(build_mesh(item, corner_potential[index]))
        _report(progress, SOLVE_SHARE + (1 - SOLVE_SHARE) * (index + 1) / len(cells))
    timings["mesh_building"] = time.perf_counter() - started
    return shapes


def _report(progress: Callable[[float], None] | None, fraction: float) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)))


_THREADS_LOCK = threading.Lock()


@contextlib.contextmanager
def _cpu_threads(device: torch.device) -> Iterator[None]:
    """Run the CPU solve on few intra-op threads: a quarter of the cores, one on a 2-core machine.

    The solver's kernels are small (1e5 to 1e6 elements, microseconds each), so extra threads gain
    little even on an idle machine, and when the other stages, the gateway or another job hold the
    cores, OpenMP workers spin-waiting for each other make a 2-thread solve 10-70x slower than a
    1-thread one (measured on 2 cores: 76 ms against 1.2-5.5 s under load).
    """
    if device.type != "cpu":
        yield
        return
    with _THREADS_LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(max(1, min(previous, (os.cpu_count() or 1) // 4)))
        try:
            yield
        finally:
            torch.set_num_threads(previous)


def _levels(resolution: int) -> int:
    return max(1, math.floor(math.log2(resolution / COARSEST_CELLS)))


def _padded_cells(resolution: int) -> int:
    """The solver's grid: the resolution rounded up to a multiple of the coarsening factor."""
    factor = 2 ** _levels(resolution)
    return -(-resolution // factor) * factor


# ----------------------------------------------------------------------------------------------
# Solver


def interior_corners(cells: torch.Tensor) -> torch.Tensor:
    """(B, M, M) cell mask -> (B, M+1, M+1) float mask of the corners whose four cells are all inside."""
    padded = torch.nn.functional.pad(cells.to(torch.float32), (1, 1, 1, 1))
    return padded[:, :-1, :-1] * padded[:, :-1, 1:] * padded[:, 1:, :-1] * padded[:, 1:, 1:]


def _laplacian(values: torch.Tensor, mask: torch.Tensor, spacing_squared: float) -> torch.Tensor:
    """-lap(values) with the 5-point stencil, on the masked corners; zero elsewhere."""
    out = torch.zeros_like(values)
    centre = values[:, 1:-1, 1:-1]
    out[:, 1:-1, 1:-1] = (
        (((centre * 4.0 - values[:, :-2, 1:-1]) - values[:, 2:, 1:-1]) - values[:, 1:-1, :-2]) - values[:, 1:-1, 2:]
    )
    return out * (mask / spacing_squared)


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item inner products, each reduced over its own slice so batching cannot change it."""
    products = a * b
    return torch.stack([torch.sum(products[i], dtype=torch.float64) for i in range(products.shape[0])])


def _restrict(fine: torch.Tensor) -> torch.Tensor:
    """Full weighting (the transpose of bilinear prolongation, over 4): (B, 2n-1, 2n-1) -> (B, n, n)."""
    batch, size, _ = fine.shape
    n = (size + 1) // 2
    rows = fine.new_zeros(batch, n, size)
    rows[:, 1:-1, :] = ((fine[:, 1:-2:2, :] + fine[:, 2:-1:2, :] * 2.0) + fine[:, 3::2, :]) * 0.25
    coarse = fine.new_zeros(batch, n, n)
    coarse[:, :, 1:-1] = ((rows[:, :, 1:-2:2] + rows[:, :, 2:-1:2] * 2.0) + rows[:, :, 3::2]) * 0.25
    return coarse


def _prolong(coarse: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation: (B, n, n) -> (B, 2n-1, 2n-1)."""
    batch, n, _ = coarse.shape
    fine = coarse.new_zeros(batch, 2 * n - 1, 2 * n - 1)
    fine[:, 0::2, 0::2] = coarse
    fine[:, 1::2, 0::2] = (coarse[:, :-1, :] + coarse[:, 1:, :]) * 0.5
    fine[:, :, 1::2] = (fine[:, :, 0:-1:2] + fine[:, :, 2::2]) * 0.5
    return fine


def _v_cycle(residual: torch.Tensor, masks: list[torch.Tensor], level: int = 0) -> torch.Tensor:
    """One V-cycle from a zero guess: a symmetric positive definite approximation of A^-1 residual."""
    mask = masks[level]
    spacing_squared = float(4**level)
    step = JACOBI_DAMPING * spacing_squared / 4.0  # damping over the stencil's diagonal
    sweeps = COARSEST_SWEEPS if level == len(masks) - 1 else SMOOTHING_SWEEPS
    correction = residual * step
    for _ in range(sweeps - 1):
        correction = correction + (residual - _laplacian(correction, mask, spacing_squared)) * step
    if level == len(masks) - 1:
        return correction
    remainder = residual - _laplacian(correction, mask, spacing_squared)
    coarse = _v_cycle(_restrict(remainder) * masks[level + 1], masks, level + 1)
    correction = correction + _prolong(coarse) * mask
    for _ in range(sweeps):
        correction = correction + (residual - _laplacian(correction, mask, spacing_squared)) * step
    return correction


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    ok = valid & (denominator > 0)
    return torch.where(ok, numerator / torch.where(ok, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


def solve_poisson(
    cells: torch.Tensor,
    *,
    max_iterations: int,
    progress: Callable[[float], None] | None = None,
    should_stop: StopCheck | None = None,
) -> torch.Tensor:
    """u on the (B, M+1, M+1) corner grid with 4u - sum(neighbours) = 1 at interior corners, u = 0 elsewhere.

    M must be a multiple of 2**levels (see _padded_cells). Units: pixels, so u is in pixels squared.
    """
    levels = _levels(cells.shape[1])
    masks = [interior_corners(cells)]
    for _ in range(levels):
        # A coarse corner is interior when the fine corner it sits on is: the coarse domain then
        # follows the fine outline to within one fine cell.
        masks.append(masks[-1][:, ::2, ::2].contiguous())
    batch = cells.shape[0]

    solution = torch.zeros_like(masks[0])
    residual = masks[0].clone()  # b = 1 on the interior corners
    initial_norm2 = _dots(residual, residual)
    tolerance2 = initial_norm2 * RELATIVE_TOLERANCE**2
    active = initial_norm2 > 0
    preconditioned = _v_cycle(residual, masks)
    direction = preconditioned
    residual_dot = _dots(residual, preconditioned)

    for iteration in range(max_iterations):
        projected = _laplacian(direction, masks[0], 1.0)
        curvature = _dots(direction, projected)
        alpha = _safe_ratio(residual_dot, curvature, active).to(torch.float32).view(batch, 1, 1)
        solution = solution + alpha * direction
        residual = residual - alpha * projected
        norm2 = _dots(residual, residual)
        active = active & (norm2 > tolerance2)
        done = iteration + 1
        if done % CHUNK_ITERATIONS == 0 or done == max_iterations:
            remaining = active.any().item()
            fraction = done / max_iterations
            if remaining:
                # Progress by residual reduction when that says more than the iteration count.
                worst = float(torch.max(torch.where(active, norm2 / initial_norm2, torch.zeros_like(norm2))))
                fraction = max(fraction, math.log(max(worst, 1e-30)) / math.log(RELATIVE_TOLERANCE**2))
            _report(progress, fraction if remaining else 1.0)
            check_stop(should_stop)
            if not remaining:
                break
        if done == max_iterations:
            break
        preconditioned = _v_cycle(residual, masks)
        new_dot = _dots(residual, preconditioned)
        beta = _safe_ratio(new_dot, residual_dot, active).to(torch.float32).view(batch, 1, 1)
        direction = preconditioned + beta * direction
        residual_dot = new_dot
    return solution


# ----------------------------------------------------------------------------------------------
# Mesh


def build_mesh(cells: np.ndarray, potential: np.ndarray) -> Shape:
    """The closed mesh of a regularised (R, R) cell mask with u on its (R+1, R+1) corners."""
    resolution = cells.shape[0]
    padded = np.pad(cells, 1)
    up_left, up_right = padded[:-1, :-1], padded[:-1, 1:]
    down_left, down_right = padded[1:, :-1], padded[1:, 1:]
    used = up_left | up_right | down_left | down_right
    interior = up_left & up_right & down_left & down_right

    corner_count = used.sum()
    front_index = np.full(used.shape, -1, np.int64)
    front_index[used] = np.arange(corner_count)
    back_index = front_index.copy()
    back_index[interior] = corner_count + np.arange(interior.sum())

    # Pixel units -> model units (the grid spans 1): height 2 sqrt(u) pixels.
    height = np.where(interior, 2.0 * np.sqrt(np.maximum(potential, 0.0)), 0.0) / resolution
    rows, cols = np.nonzero(used)
    front = np.stack([cols / resolution - 0.5, 0.5 - rows / resolution, height[rows, cols]], axis=1)
    inner_rows, inner_cols = np.nonzero(interior)
    back = np.stack(
        [inner_cols / resolution - 0.5, 0.5 - inner_rows / resolution, -height[inner_rows, inner_cols]], axis=1
    )
    vertices = np.concatenate([front, back])

    outline = _outline_neighbours(padded, front_index)
    vertices[outline[0], :2] = _taubin(vertices[outline[0], :2], outline[1], outline[2])

    faces = np.concatenate([_front_faces(cells, interior, front_index), _back_faces(cells, interior, back_index)])
    return Shape(vertices=vertices.astype(np.float32), faces=faces)


def _cell_corner_ids(cells: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, ...]:
    rows, cols = np.nonzero(cells)
    return (
        index[rows, cols],  # top-left
        index[rows, cols + 1],  # top-right
        index[rows + 1, cols + 1],  # bottom-right
        index[rows + 1, cols],  # bottom-left
        rows,
        cols,
    )


def _triangles(cells: np.ndarray, interior: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Two counter-clockwise (seen from +z) triangles per cell.

    The diagonal goes through an interior corner, so no triangle has all three corners on the
    outline (it would coincide with its mirror on the back).
    """
    a, b, c, d, rows, cols = _cell_corner_ids(cells, index)
    through_ac = interior[rows, cols] | interior[rows + 1, cols + 1]
    first = np.where(through_ac[:, None], np.stack([a, d, c], 1), np.stack([d, c, b], 1))
    second = np.where(through_ac[:, None], np.stack([a, c, b], 1), np.stack([d, b, a], 1))
    return np.concatenate([first, second])


def _front_faces(cells: np.ndarray, interior: np.ndarray, front_index: np.ndarray) -> np.ndarray:
    return _triangles(cells, interior, front_index)


def _back_faces(cells: np.ndarray, interior: np.ndarray, back_index: np.ndarray) -> np.ndarray:
    return _triangles(cells, interior, back_index)[:, ::-1]


def _outline_neighbours(padded: np.ndarray, front_index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outline vertex ids and, for each, its two neighbours along the outline (as positions in that list)."""
    above, below = padded[:-1, 1:-1], padded[1:, 1:-1]
    left, right = padded[1:-1, :-1], padded[1:-1, 1:]
    h_rows, h_cols = np.nonzero(above ^ below)  # edge (i, j)-(i, j+1)
    v_rows, v_cols = np.nonzero(left ^ right)  # edge (i, j)-(i+1, j)
    starts = np.concatenate([front_index[h_rows, h_cols], front_index[v_rows, v_cols]])
    ends = np.concatenate([front_index[h_rows, h_cols + 1], front_index[v_rows + 1, v_cols]])
    both = np.concatenate([np.stack([starts, ends], 1), np.stack([ends, starts], 1)])
    both = both[np.argsort(both[:, 0], kind="stable")]
    ids = both[0::2, 0]
    if not np.array_equal(ids, both[1::2, 0]):
        raise RuntimeError("outline vertex without exactly two outline neighbours; mask not regularised")
    position = np.full(front_index.max() + 1, -1, np.int64)
    position[ids] = np.arange(len(ids))
    return ids, position[both[0::2, 1]], position[both[1::2, 1]]


def _taubin(points: np.ndarray, first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Low-pass the outline without shrinking it: alternate +lambda and mu Laplacian steps."""
    points = points.astype(np.float64)
    for _ in range(OUTLINE_ROUNDS):
        for factor in (TAUBIN_LAMBDA, TAUBIN_MU):
            points = points + factor * ((points[first] + points[second]) * 0.5 - points)
    return points


_INSTANCE = InflateBackend()


def instance() -> InflateBackend:
    return _INSTANCE
