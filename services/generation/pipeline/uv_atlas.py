"""Stage 4 for learned meshes ("atlas" shapes): a UV atlas baked from the picture.

A learned model's surface is any closed shape, not a relief, so the two-half
layout of texture_synthesis.py does not fit it. Here:

1. Decimate to the job's face_count first (mesh_export's closed-mesh
   decimation), because an atlas belongs to one final set of faces; mesh_export
   then writes these faces and UVs as they are.
2. Unwrap with xatlas into charts packed at the texture's resolution, with a
   few texels of padding between charts.
3. Bake: each texel covered by a triangle gets that point of the surface; its
   colour is the picture at the point's (x, y) (an orthographic projection
   along z, as the shared frame promises) where the surface faces the camera
   and is not hidden behind nearer surface, and the back guess elsewhere: the
   same picture seen from behind, blurred and darkened a little (the idea of
   texture_synthesis.py's back half). Sides blend the two by how much they
   face the camera. Texels no triangle covers (gutters) are filled by
   push-pull, so bilinear and mipmapped sampling at a seam stays on colour.
4. Vertex colours come from the same colouring at the vertices; with the
   texture off they are all there is, and no atlas is made.

Deterministic: no randomness; xatlas is deterministic for the same mesh.
"""
from __future__ import annotations

import numpy as np
import xatlas
from PIL import Image
from scipy import ndimage

from services.generation.pipeline.mesh_export import decimate_closed, vertex_normals
from services.generation.pipeline.records import PreparedImage, Shape, TexturedShape, UVLayout
from services.generation.pipeline.texture_synthesis import (
    BACK_BLUR_SHARE,
    BACK_BRIGHTNESS,
    _trusted_region,
    push_pull_fill,
)

# Texels between charts (xatlas padding): enough for bilinear sampling and a couple of mip levels.
CHART_PADDING = 4
# Depth map for occlusion: cells a side, and how far behind the nearest surface still counts as seen
# (a share of the mesh's depth extent).
DEPTH_CELLS = 128
DEPTH_TOLERANCE = 0.03
# n_z from which a surface is fully "front"; below 0 it is fully "back".
FRONT_FACING_FULL = 0.35
# Candidate texels rasterised at a time (bounds memory for big atlases).
RASTER_BATCH = 1 << 20


def synthesize_atlas_texture(shape: Shape, image: PreparedImage, *, texture: bool, texture_size: int) -> TexturedShape:
    vertices, faces, _ = decimate_closed(
        shape.vertices.astype(np.float64), shape.faces.astype(np.int64), max(1, shape.face_budget)
    )
    vertices = vertices.astype(np.float32)
    final = Shape(vertices=vertices, faces=faces, texture_mapping="atlas", face_budget=shape.face_budget)
    colouring = PictureColouring(image, vertices, faces)
    normals = vertex_normals(vertices, faces)
    vertex_colors = _opaque(colouring.colour(vertices, normals))
    if not texture:
        return TexturedShape(shape=final, texture=None, vertex_colors=vertex_colors)

    layout = unwrap(vertices, faces, texture_size)
    face_of_texel, barycentric = rasterize_uv(layout.split_uv, layout.split_faces, texture_size)
    covered = face_of_texel >= 0
    corners = layout.split_source[layout.split_faces[face_of_texel[covered]]]  # (K, 3) mesh vertex ids
    weights = barycentric[covered][..., None]
    points = (vertices[corners] * weights).sum(1)
    point_normals = (normals[corners] * weights).sum(1)
    colours = np.zeros((texture_size, texture_size, 3), np.float32)
    colours[covered] = colouring.colour(points, point_normals)
    filled = push_pull_fill(colours, covered)
    atlas = np.clip(filled + 0.5, 0, 255).astype(np.uint8)
    return TexturedShape(shape=final, texture=atlas, vertex_colors=vertex_colors, uv_layout=layout)


def unwrap(vertices: np.ndarray, faces: np.ndarray, texture_size: int) -> UVLayout:
    """xatlas charts packed for a texture_size atlas; face order is kept (checked)."""
    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, np.float32), np.ascontiguousarray(faces, np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = CHART_PADDING
    pack.bilinear = True
    atlas.generate(xatlas.ChartOptions(), pack)
    source, split_faces, uv = atlas.get_mesh(0)
    source, split_faces = source.astype(np.int64), split_faces.astype(np.int64)
    if not np.array_equal(source[split_faces], faces):
        raise RuntimeError("xatlas reordered the faces")
    return UVLayout(split_source=source, split_faces=split_faces, split_uv=np.asarray(uv, np.float32))


def rasterize_uv(uv: np.ndarray, faces: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Which triangle covers each texel centre of a size x size atlas, and where in it.

    uv in glTF convention (u right, v down, [0, 1]). Returns (size, size) int64 face ids (-1: none) and
    (size, size, 3) float32 barycentric weights.
    """
    face_of_texel = np.full((size, size), -1, np.int64)
    barycentric = np.zeros((size, size, 3), np.float32)
    corners = uv[faces].astype(np.float64) * size  # (M, 3, 2) texel units, x = u, y = v
    low = np.clip(np.floor(corners.min(1) - 0.5), 0, size - 1).astype(np.int64)
    high = np.clip(np.ceil(corners.max(1) - 0.5), 0, size - 1).astype(np.int64)
    span = high - low + 1
    counts = span[:, 0] * span[:, 1]
    cumulative = np.cumsum(counts)
    start = 0
    while start < len(faces):
        # The next group of faces whose candidate texels stay under RASTER_BATCH (at least one face).
        before = int(cumulative[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(cumulative, before + RASTER_BATCH, side="right")))
        group = np.arange(start, end)
        start = end
        per_face = counts[group]
        face = np.repeat(group, per_face)
        offset = np.arange(per_face.sum()) - np.repeat(np.cumsum(per_face) - per_face, per_face)
        x = low[face, 0] + offset % span[face, 0]
        y = low[face, 1] + offset // span[face, 0]
        a, b, c = corners[face, 0], corners[face, 1], corners[face, 2]
        px, py = x + 0.5, y + 0.5
        area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
        safe = np.where(np.abs(area) > 1e-12, area, 1.0)
        w_a = ((b[:, 0] - px) * (c[:, 1] - py) - (b[:, 1] - py) * (c[:, 0] - px)) / safe
        w_b = ((c[:, 0] - px) * (a[:, 1] - py) - (c[:, 1] - py) * (a[:, 0] - px)) / safe
        w_c = 1.0 - w_a - w_b
        inside = (np.abs(area) > 1e-12) & (w_a >= -1e-6) & (w_b >= -1e-6) & (w_c >= -1e-6)
        face_of_texel[y[inside], x[inside]] = face[inside]
        barycentric[y[inside], x[inside]] = np.stack([w_a, w_b, w_c], 1)[inside]
    return face_of_texel, barycentric


class PictureColouring:
    """The colour of any surface point: the picture where the camera saw it, a guess elsewhere."""

    def __init__(self, image: PreparedImage, vertices: np.ndarray, faces: np.ndarray) -> None:
        trusted = _trusted_region(image.mask, image.rgb)
        self.front = push_pull_fill(image.rgb.astype(np.float32), trusted)
        size = self.front.shape[0]
        factor = max(1, round(size * BACK_BLUR_SHARE * 2))
        small = Image.fromarray(np.clip(self.front + 0.5, 0, 255).astype(np.uint8)).resize(
            (max(1, size // factor), max(1, size // factor)), Image.Resampling.BOX
        )
        self.back = np.asarray(small.resize((size, size), Image.Resampling.BILINEAR), np.float32) * BACK_BRIGHTNESS
        self.depth, self.tolerance = _depth_map(vertices, faces)

    def colour(self, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
        """(K, 3) float32 RGB 0..255 for surface points with their (unit) normals, in the shared frame."""
        front = _sample(self.front, points[:, :2])
        back = _sample(self.back, points[:, :2])
        facing = np.clip(normals[:, 2] / FRONT_FACING_FULL, 0.0, 1.0)
        facing = facing * facing * (3.0 - 2.0 * facing)  # smoothstep
        seen = points[:, 2] >= _sample_depth(self.depth, points[:, :2]) - self.tolerance
        weight = (facing * seen)[:, None]
        return (front * weight + back * (1.0 - weight)).astype(np.float32)


def _depth_map(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, float]:
    """The nearest surface's z (largest, +z toward the camera) over the crop, on a DEPTH_CELLS grid."""
    corners = vertices[faces].astype(np.float64)
    samples = np.concatenate([
        vertices.astype(np.float64),
        corners.mean(1),
        (corners[:, 0] + corners[:, 1]) * 0.5,
        (corners[:, 1] + corners[:, 2]) * 0.5,
        (corners[:, 2] + corners[:, 0]) * 0.5,
    ])
    cols, rows = _cells(samples[:, :2], DEPTH_CELLS)
    depth = np.full((DEPTH_CELLS, DEPTH_CELLS), -np.inf)
    np.maximum.at(depth, (rows, cols), samples[:, 2])
    # Samples are sparse on a coarse mesh: a cell takes the nearest surface around it.
    depth = ndimage.maximum_filter(depth, size=3, mode="nearest")
    extent = float(vertices[:, 2].max() - vertices[:, 2].min()) if len(vertices) else 0.0
    return depth, max(extent * DEPTH_TOLERANCE, 1e-6)


def _sample_depth(depth: np.ndarray, xy: np.ndarray) -> np.ndarray:
    cols, rows = _cells(xy, depth.shape[0])
    return depth[rows, cols]


def _cells(xy: np.ndarray, cells: int) -> tuple[np.ndarray, np.ndarray]:
    cols = np.clip(((xy[:, 0] + 0.5) * cells).astype(np.int64), 0, cells - 1)
    rows = np.clip(((0.5 - xy[:, 1]) * cells).astype(np.int64), 0, cells - 1)
    return cols, rows


def _sample(picture: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Bilinear samples of an (S, S, 3) picture at shared-frame (x, y) (the crop spans [-0.5, 0.5]^2)."""
    size = picture.shape[0]
    x = np.clip((xy[:, 0] + 0.5) * size - 0.5, 0, size - 1)
    y = np.clip((0.5 - xy[:, 1]) * size - 0.5, 0, size - 1)
    x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    return (
        picture[y0, x0] * ((1 - fx) * (1 - fy))
        + picture[y0, x1] * (fx * (1 - fy))
        + picture[y1, x0] * ((1 - fx) * fy)
        + picture[y1, x1] * (fx * fy)
    )


def _opaque(colours: np.ndarray) -> np.ndarray:
    out = np.empty((len(colours), 4), np.uint8)
    out[:, :3] = np.clip(colours + 0.5, 0, 255).astype(np.uint8)
    out[:, 3] = 255
    return out
