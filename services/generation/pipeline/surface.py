"""From a decoded occupancy volume to one closed, outward-wound triangle mesh.

A learned shape model (hunyuan3d) decodes a grid of occupancy logits: above
`level` is inside. The surface is the level set, by marching cubes
(scikit-image, Lewiner's variant, which resolves the ambiguous cube cases
consistently, so its output is a closed 2-manifold wherever the level set
does not touch the grid's edge).

- Closing: the volume is padded with one layer of "outside" before marching
  cubes, so a surface that touches the grid's bounds is capped there rather
  than left open.
- Cleaning: vertices that coincide (marching cubes puts several on one grid
  corner whose value equals the level) are merged, the faces that this
  collapses are dropped, and so are face pairs that cover the same corners
  twice; when cleaning would open the mesh, the uncleaned surface is kept.
- Floaters: only the largest connected piece (by faces) is kept.
- Winding: scikit-image winds the triangles of an inside-positive volume
  inward; they are flipped, and the signed volume checked.

Grid index (i, j, k) of the (n, n, n) volume is the point
(x, y, z) = -bound + 2 * bound * (i, j, k) / (n - 1).
"""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage import measure


class EmptySurface(ValueError):
    """The volume has no inside (or nothing but inside padding): there is no surface to extract."""


def extract_surface(logits: np.ndarray, *, bound: float, level: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(vertices (N, 3) float32, faces (M, 3) int64) of the largest closed piece of {logits > level}."""
    if logits.ndim != 3 or len(set(logits.shape)) != 1 or logits.shape[0] < 2:
        raise ValueError(f"logits must be a cubic (n, n, n) volume, got {logits.shape}")
    volume = np.asarray(logits, np.float32)
    finite = np.isfinite(volume)
    if not finite.all():
        # An overflowing decoder (fp16) can give inf or NaN: NaN is not evidence of inside.
        volume = np.where(np.isnan(volume), -np.inf, volume)
        volume = np.clip(volume, level - 1e4, level + 1e4)
    if not (volume > level).any():
        raise EmptySurface("the decoded volume has no inside")
    # "Outside" for the padding: at least as far below the level as anything in the volume.
    outside = min(float(volume.min()), level - 1.0)
    padded = np.pad(volume, 1, mode="constant", constant_values=outside)
    vertices, faces, _, _ = measure.marching_cubes(padded, level, method="lewiner")
    if len(faces) == 0:
        raise EmptySurface("marching cubes found no surface")
    cells = volume.shape[0] - 1
    vertices = ((vertices - 1.0) * (2.0 * bound / cells) - bound).astype(np.float64)
    faces = faces[:, ::-1].astype(np.int64)  # outward

    cleaned = _merge_coincident(vertices, faces)
    if cleaned is not None:
        vertices, faces = cleaned
    vertices, faces = largest_piece(vertices, faces)
    if len(faces) == 0:
        raise EmptySurface("marching cubes found no surface")
    if _signed_volume(vertices, faces) < 0:
        faces = faces[:, ::-1].copy()
    return vertices.astype(np.float32), faces


def largest_piece(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The connected piece with the most faces, unused vertices dropped."""
    if len(faces) == 0:
        return vertices[:0], faces
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(len(vertices),) * 2)
    count, labels = connected_components(graph, directed=False)
    if count > 1:
        face_labels = labels[faces[:, 0]]
        biggest = np.argmax(np.bincount(face_labels))
        faces = faces[face_labels == biggest]
    return _drop_unused(vertices, faces)


def _merge_coincident(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Weld vertices at the same position, drop the faces that collapse and doubled faces; None when the
    result would not be closed (the input is then kept as it is)."""
    from services.generation.pipeline.mesh_export import is_closed

    _, first, inverse = np.unique(vertices, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(first) == len(vertices):
        return None  # nothing coincides
    welded = inverse[faces]
    keep = (welded[:, 0] != welded[:, 1]) & (welded[:, 1] != welded[:, 2]) & (welded[:, 2] != welded[:, 0])
    welded = welded[keep]
    # Two faces over the same three corners (either winding) enclose nothing: drop both.
    corners = np.sort(welded, axis=1)
    _, position, counts = np.unique(corners, axis=0, return_inverse=True, return_counts=True)
    welded = welded[counts[position.reshape(-1)] == 1]
    if len(welded) == 0 or not is_closed(welded):
        return None
    return _drop_unused(vertices[first], welded)


def _drop_unused(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    used = np.zeros(len(vertices), bool)
    used[faces.ravel()] = True
    if used.all():
        return vertices, faces
    remap = np.cumsum(used) - 1
    return vertices[used], remap[faces]


def _signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    corners = vertices[faces].astype(np.float64)
    return float(np.einsum("ij,ij->i", corners[:, 0], np.cross(corners[:, 1], corners[:, 2])).sum() / 6.0)
