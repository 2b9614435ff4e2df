"""The `inflate` backend: a silhouette blown up into a smooth closed solid.

Height field: solve the Poisson equation -lap(u) = 1 inside the silhouette
with u = 0 on its outline, then put the front surface at +2*sqrt(u) and the
back at -2*sqrt(u) (pixel units), which turns a disk of radius r into a
sphere of radius r: u = (r^2 - |x|^2) / 4 there.

Solver: conjugate gradients preconditioned by one geometric multigrid
V-cycle (damped Jacobi smoothing, full-weighting restriction, bilinear
prolongation, an exact dense solve on the coarsest grid), on the grid of
cell corners, batched as (B, N, N) tensors. The V-cycle works in place on
buffers made once per solve: its grids are small, so the number of kernels,
views and allocations, not their size, sets its cost. It reaches a relative
residual of 1e-5 in 6 to 14 iterations from 64 to 1024 cells a side, so
`steps` (the iteration cap at the finest level) at its default of 50 always
converges; items that have converged stop moving.

Batch invariance: every step is either elementwise with plain +, -, *, /
(no fused multiply-add kernels, whose vector and scalar paths round
differently and whose split points move with the batch size) or a
reduction done per item on that item's own contiguous slice. An item's
result is therefore bit-identical alone or in any batch.

Mesh: vertices at the cell corners of the (regularised) grid mask; corners
on the outline are shared by the front and back surfaces at z = 0, so the
surface closes; two triangles per cell on the front, the mirrored pair on
the back; the outline is then smoothed in xy (Taubin), which moves no
vertex off z = 0 and changes no connectivity. Given a face budget (the
job's face_count) that this mesh exceeds, the front sheet alone is decimated
(quadric, its outline kept as it is) to half the budget and then mirrored,
so the mesh arrives near its target density, closed by construction, for a
fraction of the cost of decimating the whole closed mesh; blocks of 2 x 2
cells away from the outline start as a few larger triangles when that still
leaves the decimation work to do.
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
from services.generation.pipeline.mesh_export import DECIMATION_ATTEMPTS, is_closed_piece, simplify
from services.generation.pipeline.records import Shape

# Stop iterating once ||r|| <= RELATIVE_TOLERANCE * ||b||; below that float32 rounding dominates.
RELATIVE_TOLERANCE = 1e-5
# The coarsest multigrid level has more than half this many cells a side and at most this many; it
# is solved exactly there (a dense inverse of at most (n+1)^2 unknowns).
COARSEST_CELLS = 16
SMOOTHING_SWEEPS = 2  # damped-Jacobi sweeps before and after each coarse correction
JACOBI_DAMPING = 0.8
# Iterations between progress reports and stop checks.
CHUNK_ITERATIONS = 2
# Share of the progress bar for the solve; mesh building takes the rest.
SOLVE_SHARE = 0.8
# At most one progress report this often: each is an event the service commits and streams, and at the
# default grid a chunk of the solve takes a few ms, so a report per chunk cost the stage 10-15 % in service.
PROGRESS_INTERVAL_S = 0.05
# A face budget is met by decimating the front sheet with its outline kept whole when the outline
# takes at most this share of the sheet's faces (build_mesh).
MAX_OUTLINE_SHARE = 0.25
# Taubin smoothing of the outline: (lambda, mu) pairs.
OUTLINE_ROUNDS = 12
TAUBIN_LAMBDA = 0.5
TAUBIN_MU = -0.53

# Peak memory model, per batch item. Solver: float32 tensors of the finest corner grid alive at the
# peak, all levels together (u, r, p, Ap and their temporaries, the masks, each level's V-cycle
# buffers; measured 17.8). Mesh: bytes per grid cell while one item's mesh is built and
# kept (corner maps, positions, 4 triangles x 3 int64 per cell and their temporaries; measured
# about 340 per inside cell).
_SOLVER_TENSORS = 19
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

        last_report = -math.inf

        def fraction_done(fraction: float) -> None:
            nonlocal last_report
            now = time.perf_counter()
            if progress is not None and now - last_report >= PROGRESS_INTERVAL_S:
                last_report = now
                progress(fraction, "solving" if fraction < SOLVE_SHARE else "building meshes")

        shapes = _solve_and_build([cells[i] for i in solvable], settings.steps, device, fraction_done, should_stop,
                                  measured, [items[i].face_count for i in solvable])
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
    face_budgets: list[int] | None = None,
) -> list[Shape]:
    """Solve every regularised cell mask in one batch, then build each one's mesh (within its face
    budget, when given: see build_mesh)."""
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
        budget = face_budgets[index] if face_budgets is not None else None
        shapes.append(build_mesh(item, corner_potential[index], budget))
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
    return max(1, math.ceil(math.log2(resolution / COARSEST_CELLS)))


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


def _stencil(values: torch.Tensor) -> torch.Tensor:
    """4 u - (the four neighbours) on the inner corners: (B, n, n) -> (B, n-2, n-2).

    The outermost ring of corners is never interior, so nothing needs it."""
    return (
        (((values[:, 1:-1, 1:-1] * 4.0 - values[:, :-2, 1:-1]) - values[:, 2:, 1:-1]) - values[:, 1:-1, :-2])
        - values[:, 1:-1, 2:]
    )


def _laplacian(values: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
    """-lap(values) with the 5-point stencil, times `scaled` (the mask over h^2): zero off the mask."""
    return torch.nn.functional.pad(_stencil(values), (1, 1, 1, 1)) * scaled


def _dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item inner products, each reduced over its own slice so batching cannot change it."""
    products = a * b
    return torch.stack([torch.sum(products[i], dtype=torch.float64) for i in range(products.shape[0])])


class _Level:
    """One multigrid level: its fixed tensors, its work buffers, and the views into them.

    All are made once per solve and every V-cycle step writes in place: on this solver's small
    grids a kernel costs little next to making a tensor or even a view, and a solve runs hundreds
    of those steps per level.
    """

    def __init__(self, mask: torch.Tensor, index: int, residual: torch.Tensor | None = None) -> None:
        spacing_squared = float(4**index)  # a power of two: mask / h^2 is exact
        self.step = JACOBI_DAMPING * spacing_squared / 4.0  # damping over the stencil's diagonal
        self.mask = mask
        self.mask_inner = mask[:, 1:-1, 1:-1]
        self.scaled = mask / spacing_squared
        self.scaled_inner = self.scaled[:, 1:-1, 1:-1]
        self.smoothing_inner = (self.scaled * self.step)[:, 1:-1, 1:-1]
        # The right-hand side of this level's cycle: the solver's residual on the finest level.
        self.residual = torch.zeros_like(mask) if residual is None else residual
        self.residual_inner = self.residual[:, 1:-1, 1:-1]
        self.stepped = torch.zeros_like(mask)
        self.stepped_inner = self.stepped[:, 1:-1, 1:-1]
        self.correction = torch.zeros_like(mask)
        c = self.correction
        self.neighbourhood = (c[:, 1:-1, 1:-1], c[:, :-2, 1:-1], c[:, 2:, 1:-1], c[:, 1:-1, :-2], c[:, 1:-1, 2:])
        self.work = torch.empty_like(self.mask_inner)
        # Bilinear prolongation from the level below: even rows and columns copy it, the rest average.
        self.prolonged = torch.empty_like(mask)
        p = self.prolonged
        self.prolonged_parts = (p[:, 0::2, 0::2], p[:, 1::2, 0::2], p[:, :, 1::2], p[:, :, 0:-1:2], p[:, :, 2::2])

    def stencil_into_work(self) -> None:
        """work = 4 c - (the four neighbours of c) on the inner corners."""
        centre, up, down, left, right = self.neighbourhood
        torch.mul(centre, 4.0, out=self.work)
        self.work.sub_(up).sub_(down).sub_(left).sub_(right)

    def smooth(self) -> None:
        """One damped-Jacobi sweep on the correction: c += step r - step A c."""
        self.stencil_into_work()
        self.work.mul_(self.smoothing_inner)
        self.neighbourhood[0].add_(self.stepped_inner).sub_(self.work)


class _Coarsest:
    """The coarsest level, solved exactly: each item's dense inverse of its operator.

    The grid has at most 17 x 17 corners (COARSEST_CELLS), so a dense inverse is cheap, and one
    product replaces the dozens of smoothing sweeps (each a handful of tiny kernels) that would
    approach it. Each item is solved on buffers of its own, so no product's summation can depend
    on where the item sits in the batch.
    """

    def __init__(self, mask: torch.Tensor, index: int) -> None:
        self.mask_inner = mask[:, 1:-1, 1:-1]
        self.residual = torch.zeros_like(mask)
        self.residual_inner = self.residual[:, 1:-1, 1:-1]
        self.correction = torch.zeros_like(mask)
        self.inverses = _coarse_inverses(mask, float(4**index))
        cells = mask.shape[1] * mask.shape[2]
        self.right_sides = [torch.empty(cells, device=mask.device) for _ in self.inverses]
        self.solutions = [torch.empty(cells, device=mask.device) for _ in self.inverses]

    def solve(self) -> None:
        for index, inverse in enumerate(self.inverses):
            self.right_sides[index].copy_(self.residual[index].view(-1))
            torch.mv(inverse, self.right_sides[index], out=self.solutions[index])
            self.correction[index].view(-1).copy_(self.solutions[index])


def _coarse_inverses(mask: torch.Tensor, spacing_squared: float) -> list[torch.Tensor]:
    """Each item's exact inverse of the coarsest level's operator, as an (n*n, n*n) float32 matrix
    that is zero off the interior corners (their residual is zero, so is their correction)."""
    size = mask.shape[-1]
    grid = torch.arange(size * size, device=mask.device).view(size, size)
    neighbours = torch.zeros(size * size, size * size, dtype=torch.float64, device=mask.device)
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1, :], grid[1:, :])):
        neighbours[a.reshape(-1), b.reshape(-1)] = 1.0
        neighbours[b.reshape(-1), a.reshape(-1)] = 1.0
    inverses = []
    for item in mask:
        inside = torch.nonzero(item.reshape(-1)).view(-1)
        operator = (torch.eye(len(inside), dtype=torch.float64, device=mask.device) * 4.0
                    - neighbours[inside][:, inside]) / spacing_squared
        inverse = torch.zeros(size * size, size * size, device=mask.device)
        inverse[inside[:, None], inside[None, :]] = torch.linalg.inv(operator).to(torch.float32)
        inverses.append(inverse)
    return inverses


class _Restriction:
    """Full weighting (the transpose of bilinear prolongation, over 4) of a level's remainder, held in
    its `work` buffer on the inner corners, onto the next level's residual (inner corners only: the
    border ring is never interior)."""

    def __init__(self, fine: _Level, coarse: _Level | _Coarsest) -> None:
        work, target = fine.work, coarse.residual_inner
        self.rows = torch.empty(work.shape[0], target.shape[1], work.shape[2], device=work.device)
        self.row_parts = (work[:, 0:-2:2, :], work[:, 1:-1:2, :], work[:, 2::2, :])
        self.column_parts = (self.rows[:, :, 0:-2:2], self.rows[:, :, 1:-1:2], self.rows[:, :, 2::2])
        self.target, self.mask = target, coarse.mask_inner

    def run(self) -> None:
        # (a + 2 b) + c along each axis, the additions in that order whichever buffer holds them.
        first, middle, last = self.row_parts
        torch.mul(middle, 2.0, out=self.rows)
        self.rows.add_(first).add_(last)
        first, middle, last = self.column_parts
        torch.mul(middle, 2.0, out=self.target)
        self.target.add_(first).add_(last)
        # The two 1/4 weights at once: a power of two, so the result is the same as scaling each pass.
        self.target.mul_(0.0625).mul_(self.mask)


def _v_cycle(levels: list[_Level | _Coarsest], restrictions: list[_Restriction], index: int = 0) -> None:
    """One V-cycle from a zero guess, from levels[index].residual into levels[index].correction: a
    symmetric positive definite approximation of A^-1 residual."""
    level = levels[index]
    if isinstance(level, _Coarsest):
        level.solve()
        return
    torch.mul(level.residual, level.step, out=level.stepped)
    level.correction.copy_(level.stepped)
    for _ in range(SMOOTHING_SWEEPS - 1):
        level.smooth()
    # The remainder r - A c, into work, restricted to the next level.
    level.stencil_into_work()
    level.work.mul_(level.scaled_inner)
    torch.sub(level.residual_inner, level.work, out=level.work)
    restrictions[index].run()
    _v_cycle(levels, restrictions, index + 1)
    _add_prolonged(level, levels[index + 1].correction)
    for _ in range(SMOOTHING_SWEEPS):
        level.smooth()


def _add_prolonged(level: _Level, coarse: torch.Tensor) -> None:
    """correction += the coarse correction interpolated bilinearly (B, n, n) -> (B, 2n-1, 2n-1), masked."""
    even, odd_rows, odd_columns, left, right = level.prolonged_parts
    even.copy_(coarse)
    torch.add(coarse[:, :-1, :], coarse[:, 1:, :], out=odd_rows)
    odd_rows.mul_(0.5)
    torch.add(left, right, out=odd_columns)
    odd_columns.mul_(0.5)
    level.correction.add_(level.prolonged.mul_(level.mask))


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
    residual = masks[0].clone()  # b = 1 on the interior corners; updated in place
    finest = _Level(masks[0], 0, residual)
    smoothed = [finest] + [_Level(mask, index) for index, mask in enumerate(masks[1:-1], start=1)]
    grid: list[_Level | _Coarsest] = [*smoothed, _Coarsest(masks[-1], levels)]
    restrictions = [_Restriction(level, below) for level, below in zip(smoothed, grid[1:])]

    initial_norm2 = _dots(residual, residual)
    tolerance2 = initial_norm2 * RELATIVE_TOLERANCE**2
    active = initial_norm2 > 0
    _v_cycle(grid, restrictions)
    preconditioned = finest.correction
    direction = preconditioned.clone()  # the V-cycle's buffer is overwritten by the next cycle
    residual_dot = _dots(residual, preconditioned)

    for iteration in range(max_iterations):
        projected = _laplacian(direction, finest.scaled)
        curvature = _dots(direction, projected)
        alpha = _safe_ratio(residual_dot, curvature, active).to(torch.float32).view(batch, 1, 1)
        solution = solution + alpha * direction
        residual.sub_(alpha * projected)
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
        _v_cycle(grid, restrictions)
        new_dot = _dots(residual, preconditioned)
        beta = _safe_ratio(new_dot, residual_dot, active).to(torch.float32).view(batch, 1, 1)
        direction = preconditioned + beta * direction
        residual_dot = new_dot
    return solution


# ----------------------------------------------------------------------------------------------
# Mesh


def build_mesh(cells: np.ndarray, potential: np.ndarray, face_budget: int | None = None) -> Shape:
    """The closed mesh of a regularised (R, R) cell mask with u on its (R+1, R+1) corners.

    face_budget: when the mesh has more faces, the front sheet is decimated to half the budget with
    its outline kept as it is, then mirrored: the mesh arrives near its target density, closed by
    construction, for half the cost of decimating the closed mesh. When the outline is too long for
    the budget (MAX_OUTLINE_SHARE), or no decimation keeps the mesh closed, the full mesh is
    returned (mesh_export decimates that as any other).
    """
    resolution = cells.shape[0]
    padded = np.pad(cells, 1)
    up_left, up_right = padded[:-1, :-1], padded[:-1, 1:]
    down_left, down_right = padded[1:, :-1], padded[1:, 1:]
    used = up_left | up_right | down_left | down_right
    interior = up_left & up_right & down_left & down_right

    front_index = np.full(used.shape, -1, np.int64)
    front_index[used] = np.arange(used.sum())

    # Pixel units -> model units (the grid spans 1): height 2 sqrt(u) pixels.
    height = np.where(interior, 2.0 * np.sqrt(np.maximum(potential, 0.0)), 0.0) / resolution
    rows, cols = np.nonzero(used)
    vertices = np.stack([cols / resolution - 0.5, 0.5 - rows / resolution, height[rows, cols]], axis=1)
    outline = _outline_neighbours(padded, front_index)
    vertices[outline[0], :2] = _taubin(vertices[outline[0], :2], outline[1], outline[2])
    faces = _triangles(cells, interior, front_index)

    # The sheet's outline is kept whole, about one face per outline vertex: under a budget that would
    # leave too little for the inside, the closed mesh goes to mesh_export, which decimates the outline too.
    if face_budget is not None and 2 * len(faces) > face_budget >= len(outline[0]) * 2 / MAX_OUTLINE_SHARE:
        # Decimation starts from blocks of 2 x 2 cells away from the outline when those alone still
        # leave it work to do: half the faces to go through for the same choices near the outline.
        blocks = _block_triangles(cells, interior, front_index)
        sheet = faces if 2 * len(blocks) <= face_budget else blocks
        decimated = _decimated_sheet(vertices, sheet, face_budget)
        if decimated is not None:
            return decimated
    return _mirrored(vertices, faces, interior[rows, cols])


def _mirrored(vertices: np.ndarray, faces: np.ndarray, inside: np.ndarray) -> Shape:
    """The closed mesh of a front sheet: the vertices `inside` get a copy at -z, the outline's are shared,
    and the back faces are the front ones through that copy, wound the other way."""
    copies = np.flatnonzero(inside)
    mirror = np.arange(len(vertices))
    mirror[copies] = len(vertices) + np.arange(len(copies))
    back = vertices[copies] * np.array([1.0, 1.0, -1.0])
    return Shape(
        vertices=np.concatenate([vertices, back]).astype(np.float32),
        faces=np.concatenate([faces, mirror[faces][:, ::-1]]),
    )


def _decimated_sheet(vertices: np.ndarray, faces: np.ndarray, face_budget: int) -> Shape | None:
    """The front sheet decimated (outline kept) to about half the budget and mirrored, or None when
    every attempt breaks closure."""
    for factor, aggressiveness in DECIMATION_ATTEMPTS:
        target = int(face_budget * factor) // 2
        if target >= len(faces):
            break
        points, triangles = simplify(vertices, faces, target, aggressiveness, keep_border=True)
        shape = _mirrored(points, triangles, ~_on_border(triangles, len(points)))
        if is_closed_piece(shape.vertices, shape.faces):
            shape.checked_closed = True
            return shape
    return None


def _on_border(faces: np.ndarray, vertex_count: int) -> np.ndarray:
    """(N,) bool: the vertices on an open sheet's border, where an edge has a face on one side only."""
    heads, tails = faces.ravel(), faces[:, [1, 2, 0]].ravel()
    edges = np.sort(np.minimum(heads, tails) * vertex_count + np.maximum(heads, tails))
    repeated = edges[1:] == edges[:-1]
    alone = np.ones(len(edges), bool)
    alone[1:] &= ~repeated
    alone[:-1] &= ~repeated
    border = np.zeros(vertex_count, bool)
    border[edges[alone] // vertex_count] = True
    border[edges[alone] % vertex_count] = True
    return border


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


def _block_triangles(cells: np.ndarray, interior: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The front sheet with every 2 x 2 block of cells whose nine corners are all interior (so it
    is away from the outline) made a fan of 4 to 8 counter-clockwise triangles around its centre,
    and the other cells two triangles each (_triangles).

    A block side keeps its midpoint wherever the cells across it are not such a block, so every
    edge is shared by the faces on both of its sides (no vertex lies on another face's edge). The
    midpoints left out are vertices no face uses.
    """
    half = cells.shape[0] // 2
    corners = interior[: 2 * half + 1, : 2 * half + 1]
    solid = np.ones((half, half), bool)
    for row in range(3):
        for col in range(3):
            solid &= corners[row : row + 2 * half : 2, col : col + 2 * half : 2]
    fine = cells.copy()
    fine[: 2 * half, : 2 * half] &= ~np.repeat(np.repeat(solid, 2, axis=0), 2, axis=1)
    framed = np.pad(solid, 1)
    block_rows, block_cols = np.nonzero(solid)
    top, left = 2 * block_rows, 2 * block_cols
    centre = index[top + 1, left + 1]
    # The block's outline counter-clockwise (seen from +z, rows growing downward): the corner each
    # side starts from, its midpoint, and whether the block across that side is solid too.
    sides = (
        (index[top, left], index[top + 1, left], framed[block_rows + 1, block_cols]),  # left, downward
        (index[top + 2, left], index[top + 2, left + 1], framed[block_rows + 2, block_cols + 1]),  # bottom
        (index[top + 2, left + 2], index[top + 1, left + 2], framed[block_rows + 1, block_cols + 2]),  # right
        (index[top, left + 2], index[top, left + 1], framed[block_rows, block_cols + 1]),  # top, leftward
    )
    fans = [_triangles(fine, interior, index)]
    for number, (start, middle, shared) in enumerate(sides):
        end = sides[(number + 1) % 4][0]
        fans.append(np.stack([centre, start, end], 1)[shared])
        split = ~shared
        fans.append(np.stack([centre[split], start[split], middle[split]], 1))
        fans.append(np.stack([centre[split], middle[split], end[split]], 1))
    return np.concatenate(fans)


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
