"""The records that pass between the five pipeline stages.

Coordinate frame shared by every backend and stage: the square crop made by
image_preprocessing maps onto [-0.5, 0.5]^2 in x (right) and y (up), and +z
points toward the viewer (the camera that took the picture). A mesh in this
frame can be textured by projecting the picture along z, whatever backend
made it. Shape and TexturedShape are in this frame.

Model units: mesh_export then centres the mesh's bounding box on the origin
and scales it uniformly so that its longest extent is 1 (axes unchanged:
y up, +z toward the viewer, which is also glTF's frame). The exported files
and ExportedMesh's volume and extents are in those units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The five stages, in the order they run; every stage-keyed table uses these names.
# They belong to the contract (generation.proto's Stage enum), read in services.common.
from services.common.stages import STAGES  # noqa: F401 - re-exported for the pipeline


@dataclass
class LoadedImage:
    """image_loading's output: the decoded picture, upright (EXIF applied)."""

    rgba: np.ndarray  # (H, W, 4) uint8
    has_alpha: bool  # True when the alpha channel carries a real mask
    source_format: str  # "PNG", "JPEG", ...
    size: tuple[int, int]  # (width, height) as decoded, upright; rgba may be smaller (big pictures are reduced)


@dataclass
class PreparedImage:
    """image_preprocessing's output: the object cropped, recentred, square."""

    rgb: np.ndarray  # (S, S, 3) uint8 square crop, background pixels filled
    mask: np.ndarray  # (S, S) bool foreground in the crop
    grid_mask: np.ndarray  # (R, R) bool foreground at the reconstruction resolution R
    mask_source: str  # "alpha", "segmentation" or "full"
    source_mask: np.ndarray  # (H, W) bool: the mask chosen, at LoadedImage.rgba's size (the cut-out a user sees)


# How texture_synthesis colours a shape (Shape.texture_mapping).
# "two_sided": a relief whose front (z >= 0) and back are each the picture projected along z; the atlas
#   is the picture twice, mesh_export decimates and maps faces to a half by the side they lie on (inflate).
# "atlas": any closed surface (a learned model's): texture_synthesis decimates to `face_budget`, unwraps a
#   UV atlas (xatlas) and bakes the picture into it; mesh_export writes those UVs without decimating again.
TEXTURE_MAPPINGS: tuple[str, ...] = ("two_sided", "atlas")


@dataclass
class Shape:
    """shape_generation's output: one closed, outward-wound triangle mesh."""

    vertices: np.ndarray  # (N, 3) float32, in the shared frame
    faces: np.ndarray  # (M, 3) int64
    texture_mapping: str = "two_sided"  # one of TEXTURE_MAPPINGS
    face_budget: int = 0  # "atlas" only: the job's face_count, reached before unwrapping
    # True when the backend has checked that these very arrays are closed and one piece
    # (mesh_export.is_closed_piece), so mesh_export need not check again.
    checked_closed: bool = False


@dataclass
class UVLayout:
    """A texture atlas's mapping of a final (already decimated) mesh: vertices split along the seams."""

    split_source: np.ndarray  # (N', ) int64: the Shape vertex each split vertex copies
    split_faces: np.ndarray  # (M, 3) int64 into the split vertices, face for face with Shape.faces
    split_uv: np.ndarray  # (N', 2) float32, glTF convention (origin top-left, v down)


@dataclass
class TexturedShape:
    """texture_synthesis's output: the shape and what colours it."""

    shape: Shape
    texture: np.ndarray | None  # (T, T, 3) uint8 atlas, None when texture is off
    vertex_colors: np.ndarray  # (N, 4) uint8, always set (PLY uses them)
    extras: dict[str, object] = field(default_factory=dict)  # stage-private mapping data
    # Set for "atlas" shapes: the mesh is final (mesh_export does not decimate it) and, when the
    # texture is on, this is where each face corner samples it.
    uv_layout: UVLayout | None = None


@dataclass
class ExportedMesh:
    """mesh_export's output: the asked-for formats' file bytes, the source of the others, the statistics."""

    files: dict[str, bytes]  # format ("glb", "obj", "stl", "ply") -> file bytes
    vertices: int
    faces: int
    watertight: bool
    volume: float
    extents: tuple[float, float, float]
    # The final mesh and texture, packed: any format not in `files` is written from it on request.
    source: bytes = b""
