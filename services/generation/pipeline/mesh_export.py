"""Stage 5: decimate, map, normalise, and write the format asked for.

Decimation is quadric (fast_simplification) on the closed mesh; the result
is checked (every edge shared by exactly two faces in opposite directions,
one connected component) and, when a collapse broke that, redone less
aggressively, then with a gentler target, down to keeping the undecimated
mesh. The inflate backend usually hands over a mesh already within the
face count (it decimates its front sheet before mirroring it, with the same
attempts and checks: backends/inflate.py), which is then written as it is.

Texture mapping follows texture_synthesis's atlas: faces whose centroid
lies in front of z = 0 sample the front half, the others the back half;
vertices used by both are split (same position, two texture coordinates).
Formats that carry no texture coordinates (STL, PLY) and the statistics
use the merged mesh, which is the watertight one.

A learned mesh ("atlas" shape, see records.py) arrives final: texture_synthesis
decimated it before unwrapping its UV atlas, so it is written as it is, with
the UVs and vertex colours it carries.

Model units: mesh_export centres the bounding box on the origin and scales
uniformly so that the longest extent is 1 (see records.py).

Formats: a job writes the format it asked for, plus the mesh's "source" (the
final arrays and the texture, packed with numpy), from which any other format
is written the first time somebody asks for it (`write_from_source`). So a job
pays for one writer, not four. The writers are trimesh's where they are not
slower (STL, PLY); GLB and OBJ are written here, being several times faster
than trimesh's (bench/exporters.py, figures in bench/RESULTS.md). Textures
are JPEG: a photographic atlas compresses five times smaller than PNG and
encodes more than ten times faster, and glTF and OBJ readers take both.
"""
from __future__ import annotations

import io
import json
import struct
import threading
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fast_simplification
import numpy as np
import trimesh
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from services.common.errors import InvalidArgument
from services.generation.pipeline.params import FORMATS
from services.generation.pipeline.records import ExportedMesh, TexturedShape
from services.generation.pipeline.texture_synthesis import (
    EXTRAS_ATLAS,
    atlas_uv,
    sample_atlas,
)

# fast_simplification keeps the mesh being simplified in module-level C++ state: one call at a time.
_SIMPLIFY_LOCK = threading.Lock()
# Attempts in order, as (target factor, aggressiveness). A collapse that pinches two sheets of a
# thin part into one edge breaks closure; which collapses happen depends on both knobs, so a
# failure is retried at the same target less aggressively before the target is raised.
# One decimation to at most `target` faces at an aggressiveness: (vertices, faces, target, aggressiveness).
Simplifier = Callable[[np.ndarray, np.ndarray, int, float], tuple[np.ndarray, np.ndarray]]
DECIMATION_ATTEMPTS = ((1.0, 7.0), (1.0, 5.0), (1.0, 3.0), (1.25, 5.0), (1.6, 5.0), (2.5, 3.0))
JPEG_QUALITY = 90
OBJ_NAME, MTL_NAME, TEXTURE_NAME = "model.obj", "model.mtl", "texture.jpg"
# What a source file holds: _Mesh's arrays, plus the texture as JPEG bytes (absent when the texture is off).
_SOURCE_FIELDS = ("vertices", "faces", "normals", "colors", "split_source", "split_faces", "split_uv", "split_colors")
_INDEX_FIELDS = ("faces", "split_source", "split_faces")


@dataclass
class _Mesh:
    """The merged (watertight) mesh plus everything the writers need."""

    vertices: np.ndarray  # (N, 3) float32, normalised
    faces: np.ndarray  # (M, 3) int64
    normals: np.ndarray  # (N, 3) float32, unit
    colors: np.ndarray  # (N, 4) uint8
    # The texture-mapped copy: vertices split at the front/back seam.
    split_source: np.ndarray  # (N', ) int64: merged vertex of each split vertex
    split_faces: np.ndarray  # (M, 3) int64 into the split vertices
    split_uv: np.ndarray  # (N', 2) float32, glTF convention
    split_colors: np.ndarray  # (N', 4) uint8


def export_mesh(
    textured: TexturedShape, *, face_count: int, formats: Sequence[str] = FORMATS
) -> ExportedMesh:
    """The formats asked for (all four by default) and the source any other one can be written from."""
    for name in formats:
        if name not in FORMATS:
            raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}, got {name!r}")
    if textured.shape.texture_mapping == "atlas":
        vertices = textured.shape.vertices.astype(np.float64)
        faces = textured.shape.faces.astype(np.int64)
        closed = is_closed_piece(vertices, faces)
        mesh = _normalise_final(vertices, faces, textured)
    else:
        vertices, faces, closed = decimate_closed(
            textured.shape.vertices.astype(np.float64), textured.shape.faces.astype(np.int64), face_count,
            checked_closed=textured.shape.checked_closed,
        )
        mesh = _map_and_normalise(vertices, faces, textured)
    # Encoded once: the files written now and the source (for the formats written later) share it.
    image = _encode_jpeg(textured.texture) if textured.texture is not None else None
    files = {name: _write(mesh, name, image) for name in dict.fromkeys(formats)}
    low, high = column_bounds(mesh.vertices)
    extents = high - low
    return ExportedMesh(
        files=files,
        vertices=len(mesh.vertices),
        faces=len(mesh.faces),
        watertight=closed,
        volume=signed_volume(mesh.vertices, mesh.faces),
        extents=(float(extents[0]), float(extents[1]), float(extents[2])),
        source=pack_source(mesh, image),
    )


def pack_source(mesh: _Mesh, jpeg: bytes | None) -> bytes:
    """The final mesh and its encoded texture, uncompressed but compact (indices as int32): a few
    milliseconds to write and read back, and about a third of the size the raw arrays would take."""
    buffer = io.BytesIO()
    arrays = {
        name: (value.astype(np.int32) if name in _INDEX_FIELDS else value)
        for name in _SOURCE_FIELDS
        for value in [getattr(mesh, name)]
    }
    if jpeg is not None:
        arrays["texture_jpeg"] = np.frombuffer(jpeg, np.uint8)
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def write_from_source(source: bytes, fmt: str) -> bytes:
    """One format's file from a source written by export_mesh: byte for byte what export_mesh writes."""
    if fmt not in FORMATS:
        raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}, got {fmt!r}")
    with np.load(io.BytesIO(source), allow_pickle=False) as arrays:
        mesh = _Mesh(**{
            name: arrays[name].astype(np.int64) if name in _INDEX_FIELDS else arrays[name] for name in _SOURCE_FIELDS
        })
        jpeg = arrays["texture_jpeg"].tobytes() if "texture_jpeg" in arrays.files else None
    return _write(mesh, fmt, jpeg)


def _write(mesh: _Mesh, fmt: str, image: bytes | None) -> bytes:
    if fmt == "glb":
        return _write_glb(mesh, image)
    if fmt == "obj":
        return _write_obj_zip(mesh, image)
    if fmt == "stl":
        return _trimesh_of(mesh).export(file_type="stl")
    return _trimesh_of(mesh).export(file_type="ply", encoding="binary", vertex_normal=True)


def _trimesh_of(mesh: _Mesh) -> trimesh.Trimesh:
    """The merged (watertight) mesh with normals and vertex colours, for trimesh's writers."""
    return trimesh.Trimesh(
        vertices=mesh.vertices,
        faces=mesh.faces,
        vertex_normals=mesh.normals,
        vertex_colors=mesh.colors,
        process=False,
        validate=False,
    )


# ----------------------------------------------------------------------------------------------
# Decimation and checks


def decimate_closed(
    vertices: np.ndarray,
    faces: np.ndarray,
    face_count: int,
    *,
    checked_closed: bool = False,
    simplifier: Simplifier | None = None,
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Quadric decimation to about face_count faces that keeps the mesh closed and in one piece.

    Returns the vertices, the faces and whether the result is closed and one piece (false only
    when the input itself was not). checked_closed: the input is known to be closed and one piece.
    simplifier: one decimation, `simplify` by default (the tests of the retries give one that breaks).
    """
    simplify_once = simplifier or simplify
    if len(faces) <= face_count:
        return vertices, faces, checked_closed or is_closed_piece(vertices, faces)
    for factor, aggressiveness in DECIMATION_ATTEMPTS:
        target = int(face_count * factor)
        if target >= len(faces):
            break
        points, triangles = simplify_once(vertices, faces, target, aggressiveness)
        if is_closed_piece(points, triangles):
            return points, triangles, True
    return vertices, faces, is_closed_piece(vertices, faces)


def simplify(
    vertices: np.ndarray, faces: np.ndarray, target: int, aggressiveness: float, *, keep_border: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One quadric decimation to at most `target` faces, degenerate faces and unused vertices dropped.

    keep_border: an open sheet's border vertices are neither moved nor removed, so whatever is
    stitched to that border still fits it.
    """
    with _SIMPLIFY_LOCK:
        points, triangles = fast_simplification.simplify(
            vertices, faces, target_count=target, agg=aggressiveness, preserve_border=keep_border
        )
    return _drop_degenerate(points, triangles.astype(np.int64))


def is_closed_piece(vertices: np.ndarray, faces: np.ndarray) -> bool:
    return is_closed(faces) and _component_count(faces, len(vertices)) == 1


def _drop_degenerate(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove faces with a repeated corner and vertices no face uses."""
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 2] != faces[:, 0])
    faces = faces[keep]
    used = np.zeros(len(vertices), bool)
    used[faces.ravel()] = True
    if used.all():
        return vertices, faces
    remap = np.cumsum(used) - 1
    return vertices[used], remap[faces]


def is_closed(faces: np.ndarray) -> bool:
    """Every edge used exactly twice, once in each direction: closed and consistently wound."""
    if len(faces) == 0:
        return False
    count = int(faces.max()) + 1
    heads = faces.ravel()
    tails = faces[:, [1, 2, 0]].ravel()
    # One sort: the undirected edge in the high bits, its direction in the lowest bit. A closed,
    # consistently wound mesh then sorts into pairs (2e, 2e + 1), each edge in exactly one pair.
    keys = (np.minimum(heads, tails) * count + np.maximum(heads, tails)) * 2 + (heads > tails)
    keys.sort()
    if len(keys) % 2:
        return False
    first, second = keys[0::2], keys[1::2]
    return bool(
        np.all(first % 2 == 0) and np.all(second == first + 1) and np.all(first[1:] > second[:-1])
    )


def _component_count(faces: np.ndarray, vertex_count: int) -> int:
    # Two edges per face join all three corners.
    edges = faces[:, [0, 1, 1, 2]].reshape(-1, 2)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(vertex_count,) * 2)
    return int(connected_components(graph, directed=False)[0])


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    first, second, third = _corner_rows(vertices, faces)
    return float(np.dot(first[0], second[1] * third[2] - second[2] * third[1])
                 + np.dot(first[1], second[2] * third[0] - second[0] * third[2])
                 + np.dot(first[2], second[0] * third[1] - second[1] * third[0])) / 6.0


def _corner_rows(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each face corner's position as (3, M) float64 rows (x, y, z): whole-row arithmetic on them is
    several times faster than on (M, 3) columns."""
    rows = np.ascontiguousarray(vertices.T, np.float64)
    return rows[:, faces[:, 0]], rows[:, faces[:, 1]], rows[:, faces[:, 2]]


# ----------------------------------------------------------------------------------------------
# Mapping


def _map_and_normalise(vertices: np.ndarray, faces: np.ndarray, textured: TexturedShape) -> _Mesh:
    atlas = textured.extras[EXTRAS_ATLAS]
    assert isinstance(atlas, np.ndarray)
    size = atlas.shape[0]

    # Side of each face, in the shared frame (before normalising moves z = 0).
    depth = vertices[:, 2]
    face_is_back = (depth[faces[:, 0]] + depth[faces[:, 1]]) + depth[faces[:, 2]] < 0
    used_front = np.zeros(len(vertices), bool)
    used_front[faces[~face_is_back].ravel()] = True
    used_back = np.zeros(len(vertices), bool)
    used_back[faces[face_is_back].ravel()] = True
    seam = used_front & used_back
    copy_of = np.flatnonzero(seam)
    copy_index = np.full(len(vertices), -1, np.int64)
    copy_index[copy_of] = len(vertices) + np.arange(len(copy_of))
    split_faces = faces.copy()
    back_faces = split_faces[face_is_back]
    split_faces[face_is_back] = np.where(seam[back_faces], copy_index[back_faces], back_faces)
    split_source = np.concatenate([np.arange(len(vertices)), copy_of])
    split_is_back = np.concatenate([~used_front, np.ones(len(copy_of), bool)])
    split_uv = atlas_uv(vertices[split_source, :2], split_is_back, size)
    split_colors = sample_atlas(atlas, split_uv)
    colors = split_colors[: len(vertices)]  # the front colour wherever a vertex has one

    normalised = _normalise(vertices)
    return _Mesh(
        vertices=normalised,
        faces=faces,
        normals=vertex_normals(normalised, faces),
        colors=colors,
        split_source=split_source,
        split_faces=split_faces,
        split_uv=split_uv,
        split_colors=split_colors,
    )


def _normalise_final(vertices: np.ndarray, faces: np.ndarray, textured: TexturedShape) -> _Mesh:
    """A final mesh with its own colours and, when textured, its own UV layout."""
    normalised = _normalise(vertices)
    layout = textured.uv_layout
    if layout is None:
        # No texture: the split copy is the mesh itself (only the textured writers read it).
        split_source = np.arange(len(vertices), dtype=np.int64)
        split_faces, split_uv = faces, np.zeros((len(vertices), 2), np.float32)
    else:
        split_source, split_faces, split_uv = layout.split_source, layout.split_faces, layout.split_uv
    return _Mesh(
        vertices=normalised,
        faces=faces,
        normals=vertex_normals(normalised, faces),
        colors=textured.vertex_colors,
        split_source=split_source,
        split_faces=split_faces,
        split_uv=split_uv,
        split_colors=textured.vertex_colors[split_source],
    )


def _normalise(vertices: np.ndarray) -> np.ndarray:
    low, high = column_bounds(vertices)
    scale = 1.0 / max(float((high - low).max()), 1e-12)
    return ((vertices - (low + high) * 0.5) * scale).astype(np.float32)


def column_bounds(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each column's minimum and maximum of an (N, k) array.

    Reduced over a transposed copy: NumPy reduces a narrow array along its long axis some twenty
    times slower than a contiguous row.
    """
    columns = np.ascontiguousarray(values.T)
    return columns.min(1), columns.max(1)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Area-weighted vertex normals, unit length (a vertex with no area gets +z)."""
    first, second, third = _corner_rows(vertices, faces)
    u, v = second - first, third - first
    face_normals = (u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0])
    corners_of = faces.T.ravel()  # every face's first corner, then every second, then every third
    sums = np.stack([np.bincount(corners_of, np.tile(axis, 3), minlength=len(vertices)) for axis in face_normals])
    lengths = np.sqrt(sums[0] * sums[0] + sums[1] * sums[1] + sums[2] * sums[2])
    normals = np.where(lengths > 1e-20, sums / np.maximum(lengths, 1e-20), np.array([[0.0], [0.0], [1.0]]))
    return np.ascontiguousarray(normals.T, np.float32)


def _encode_jpeg(texture: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(texture).save(buffer, "JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# GLB


def _write_glb(mesh: _Mesh, jpeg: bytes | None) -> bytes:
    """glTF 2.0 binary: one mesh, one material; textured (split vertices) or vertex-coloured (merged)."""
    if jpeg is not None:
        positions = mesh.vertices[mesh.split_source]
        normals = mesh.normals[mesh.split_source]
        faces = mesh.split_faces
        extra = ("TEXCOORD_0", mesh.split_uv.astype(np.float32), 5126, "VEC2", False)
    else:
        positions, normals, faces = mesh.vertices, mesh.normals, mesh.faces
        extra = ("COLOR_0", mesh.colors, 5121, "VEC4", True)

    blob = bytearray()
    views: list[dict[str, object]] = []
    accessors: list[dict[str, object]] = []

    def add_view(data: bytes, target: int | None) -> int:
        while len(blob) % 4:
            blob.append(0)
        view: dict[str, object] = {"buffer": 0, "byteOffset": len(blob), "byteLength": len(data)}
        if target is not None:
            view["target"] = target
        blob.extend(data)
        views.append(view)
        return len(views) - 1

    def add_accessor(array: np.ndarray, component: int, kind: str, target: int, normalized: bool = False,
                     bounds: bool = False) -> int:
        accessor: dict[str, object] = {
            "bufferView": add_view(np.ascontiguousarray(array).tobytes(), target),
            "componentType": component,
            "count": len(array),
            "type": kind,
        }
        if normalized:
            accessor["normalized"] = True
        if bounds:
            low, high = column_bounds(array)
            accessor["min"] = [float(v) for v in low]
            accessor["max"] = [float(v) for v in high]
        accessors.append(accessor)
        return len(accessors) - 1

    attributes = {
        "POSITION": add_accessor(positions.astype(np.float32), 5126, "VEC3", 34962, bounds=True),
        "NORMAL": add_accessor(normals.astype(np.float32), 5126, "VEC3", 34962),
        extra[0]: add_accessor(extra[1], extra[2], extra[3], 34962, normalized=extra[4]),
    }
    # 16-bit indices whenever they can address every vertex (65535 itself is glTF's reserved restart
    # value): a default job's GLB is a fifth smaller, and every glTF loader reads them.
    if len(positions) < 65535:
        indices = add_accessor(faces.astype(np.uint16).ravel(), 5123, "SCALAR", 34963)
    else:
        indices = add_accessor(faces.astype(np.uint32).ravel(), 5125, "SCALAR", 34963)
    material: dict[str, object] = {
        "name": "model",
        "pbrMetallicRoughness": {"metallicFactor": 0.0, "roughnessFactor": 1.0},
    }
    document: dict[str, object] = {
        "asset": {"version": "2.0", "generator": "ORFEAS"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": "model"}],
        "meshes": [{"name": "model", "primitives": [
            {"attributes": attributes, "indices": indices, "material": 0, "mode": 4}
        ]}],
        "materials": [material],
        "accessors": accessors,
        "bufferViews": views,
    }
    if jpeg is not None:
        document["images"] = [{"bufferView": add_view(jpeg, None), "mimeType": "image/jpeg"}]
        document["samplers"] = [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}]
        document["textures"] = [{"sampler": 0, "source": 0}]
        material["pbrMetallicRoughness"]["baseColorTexture"] = {"index": 0}  # type: ignore[index]
    while len(blob) % 4:
        blob.append(0)
    document["buffers"] = [{"byteLength": len(blob)}]

    json_chunk = json.dumps(document, separators=(",", ":")).encode()
    json_chunk += b" " * (-len(json_chunk) % 4)
    total = 12 + 8 + len(json_chunk) + 8 + len(blob)
    return b"".join([
        struct.pack("<4sII", b"glTF", 2, total),
        struct.pack("<I4s", len(json_chunk), b"JSON"), json_chunk,
        struct.pack("<I4s", len(blob), b"BIN\x00"), bytes(blob),
    ])


# ----------------------------------------------------------------------------------------------
# OBJ (zip of OBJ + MTL + PNG)


def _write_obj_zip(mesh: _Mesh, jpeg: bytes | None) -> bytes:
    """Positions are the merged vertices (so the OBJ is closed as written); texture coordinates are
    the split ones, referenced per face corner."""
    parts = [f"# ORFEAS\nmtllib {MTL_NAME}\no model\n".encode()]
    if jpeg is not None:
        parts.append(_format_rows(b"v", [mesh.vertices]))
        uv = mesh.split_uv.astype(np.float64).copy()
        uv[:, 1] = 1.0 - uv[:, 1]  # OBJ puts the texture origin at the bottom-left
        parts.append(_format_rows(b"vt", [uv]))
        parts.append(_format_rows(b"vn", [mesh.normals]))
        parts.append(b"usemtl model\n")
        position = mesh.faces + 1
        texture = mesh.split_faces + 1
        corners = np.stack([position, texture, position], axis=2).reshape(len(position), 9)
        parts.append(_format_faces(corners, per_corner=3))
        material = f"newmtl model\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {TEXTURE_NAME}\n"
    else:
        # The common "v x y z r g b" extension carries the vertex colours.
        parts.append(_format_rows(b"v", [mesh.vertices, mesh.colors[:, :3] / 255.0]))
        parts.append(_format_rows(b"vn", [mesh.normals]))
        parts.append(b"usemtl model\n")
        position = mesh.faces + 1
        parts.append(_format_faces(np.stack([position, position], axis=2).reshape(len(position), 6), per_corner=2,
                                   skip_texture=True))
        material = "newmtl model\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\n"

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(_zip_entry(OBJ_NAME, zipfile.ZIP_DEFLATED), b"".join(parts), compresslevel=1)
        archive.writestr(_zip_entry(MTL_NAME, zipfile.ZIP_DEFLATED), material, compresslevel=1)
        if jpeg is not None:
            archive.writestr(_zip_entry(TEXTURE_NAME, zipfile.ZIP_STORED), jpeg)
    return buffer.getvalue()


def _zip_entry(name: str, compression: int) -> zipfile.ZipInfo:
    # A fixed timestamp: the same mesh always zips to the same bytes (and checksum),
    # instead of carrying the second it was written.
    entry = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    entry.compress_type = compression
    return entry


_DIGITS = np.frombuffer(b"0123456789", np.uint8)
_GAP = 0  # placeholder byte, dropped after assembly


def _integer_columns(values: np.ndarray, width: int) -> np.ndarray:
    """(N,) non-negative ints -> (N, width) ASCII digits, leading zeros as gaps."""
    digits = np.empty((len(values), width), np.uint8)
    remaining = values.astype(np.int64)
    for column in range(width - 1, -1, -1):
        digits[:, column] = _DIGITS[remaining % 10]
        remaining //= 10
    # Blank leading zeros, keeping at least the last digit.
    significant = np.cumsum(digits != ord("0"), axis=1) > 0
    significant[:, -1] = True
    digits[~significant] = _GAP
    return digits


def _decimal_columns(values: np.ndarray, decimals: int = 6) -> np.ndarray:
    """(N,) floats -> fixed-point ASCII columns: optional '-', integer digits, '.', decimals."""
    scaled = np.rint(np.abs(values.astype(np.float64)) * 10**decimals).astype(np.int64)
    integer_width = max(1, len(str(int(scaled.max(initial=0)) // 10**decimals)))
    integer_part = _integer_columns(scaled // 10**decimals, integer_width)
    fraction = scaled % 10**decimals
    fraction_digits = np.empty((len(values), decimals), np.uint8)
    for column in range(decimals - 1, -1, -1):
        fraction_digits[:, column] = _DIGITS[fraction % 10]
        fraction //= 10
    sign = np.where((values < 0) & (scaled > 0), ord("-"), _GAP).astype(np.uint8)[:, None]
    point = np.full((len(values), 1), ord("."), np.uint8)
    return np.concatenate([sign, integer_part, point, fraction_digits], axis=1)


def _assemble(columns: list[np.ndarray]) -> bytes:
    table = np.concatenate(columns, axis=1).ravel()
    return table[table != _GAP].tobytes()


def _constant(text: bytes, rows: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text, np.uint8), (rows, len(text)))


def _format_rows(keyword: bytes, blocks: list[np.ndarray]) -> bytes:
    """Lines of `keyword x y z ...`, six decimals, without Python-level formatting per number."""
    values = np.concatenate([np.asarray(b, np.float64).reshape(len(b), -1) for b in blocks], axis=1)
    rows = len(values)
    columns: list[np.ndarray] = [_constant(keyword, rows)]
    for index in range(values.shape[1]):
        columns.append(_constant(b" ", rows))
        columns.append(_decimal_columns(values[:, index]))
    columns.append(_constant(b"\n", rows))
    return _assemble(columns)


def _format_faces(corners: np.ndarray, per_corner: int, skip_texture: bool = False) -> bytes:
    """`f a/b/c ...` lines from (M, 3 * per_corner) one-based indices."""
    rows = len(corners)
    width = len(str(int(corners.max(initial=1))))
    columns: list[np.ndarray] = [_constant(b"f", rows)]
    for corner in range(3):
        columns.append(_constant(b" ", rows))
        for slot in range(per_corner):
            if slot:
                columns.append(_constant(b"//" if skip_texture else b"/", rows))
            columns.append(_integer_columns(corners[:, corner * per_corner + slot], width))
    columns.append(_constant(b"\n", rows))
    return _assemble(columns)


