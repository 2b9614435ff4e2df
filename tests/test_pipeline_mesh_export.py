"""mesh_export: decimation that keeps the mesh closed, and four formats that reload watertight."""
from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from services.common.errors import InvalidArgument
from services.generation.backends import get_backend
from services.generation.backends.base import ShapeItem, ShapeSettings
from services.generation.pipeline import mesh_export
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.mesh_export import (
    _assemble,
    _decimal_columns,
    _integer_columns,
    decimate_closed,
    export_mesh,
    is_closed,
)
from services.generation.pipeline.records import LoadedImage, TexturedShape
from services.generation.pipeline.texture_synthesis import synthesize_texture


def textured_blob(texture: bool, resolution: int = 160) -> TexturedShape:
    """A two-lobed, holed silhouette (genus 1), coloured left/right."""
    side = 400
    ys, xs = np.mgrid[:side, :side] + 0.5
    inside = ((xs - 150) ** 2 + (ys - 200) ** 2 < 100**2) | ((xs - 270) ** 2 + (ys - 200) ** 2 < 80**2)
    inside &= (xs - 150) ** 2 + (ys - 200) ** 2 > 30**2  # a hole through the bigger lobe
    rgb = np.where((xs < 200)[..., None], np.array((200, 60, 40), np.uint8), np.array((40, 80, 200), np.uint8))
    loaded = LoadedImage(rgba=np.dstack([rgb, inside.astype(np.uint8) * 255]), has_alpha=True, source_format="PNG",
                         size=(side, side))
    prepared = prepare_image(loaded, remove_background="auto", foreground_ratio=0.85, resolution=resolution)
    (shape,) = get_backend("inflate").generate([prepared.grid_mask], steps=50, device=torch.device("cpu"))
    return synthesize_texture(shape, prepared, texture=texture, texture_size=512, seed=0)


@pytest.fixture(scope="module")
def textured() -> TexturedShape:
    return textured_blob(texture=True)


@pytest.fixture(scope="module")
def exported(textured: TexturedShape):
    return export_mesh(textured, face_count=8000)


def merged(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


def reload(exported_mesh, fmt: str) -> trimesh.Trimesh:
    data = exported_mesh.files[fmt]
    if fmt == "obj":
        archive = zipfile.ZipFile(io.BytesIO(data))
        return trimesh.load(io.BytesIO(archive.read("model.obj")), file_type="obj", force="mesh",
                            resolver=trimesh.resolvers.ZipResolver(archive))
    return trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh")


# ---------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize("fmt", ["glb", "obj", "stl", "ply"])
def test_every_format_reloads_watertight(exported, fmt: str) -> None:
    mesh = merged(reload(exported, fmt))
    assert len(mesh.faces) == exported.faces
    assert len(mesh.vertices) == exported.vertices
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.body_count == 1
    assert mesh.volume == pytest.approx(exported.volume, rel=1e-4)
    assert np.allclose(mesh.extents, exported.extents, atol=1e-5)


def test_statistics(exported, textured: TexturedShape) -> None:
    assert exported.watertight
    assert set(exported.files) == {"glb", "obj", "stl", "ply"}
    assert 0.9 * 8000 <= exported.faces <= 8000
    assert max(exported.extents) == pytest.approx(1.0)
    assert exported.volume > 0
    original = trimesh.Trimesh(textured.shape.vertices, textured.shape.faces, process=False)
    scale = 1.0 / original.extents.max()
    assert exported.volume == pytest.approx(original.volume * scale**3, rel=0.02)
    assert merged(reload(exported, "stl")).euler_number == 0  # the hole survives decimation


def read_glb(data: bytes) -> tuple[dict, bytes]:
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_length, json_type = struct.unpack_from("<I4s", data, 12)
    assert json_type == b"JSON" and json_length % 4 == 0
    document = json.loads(data[20 : 20 + json_length])
    bin_length, bin_type = struct.unpack_from("<I4s", data, 20 + json_length)
    assert bin_type == b"BIN\x00" and bin_length % 4 == 0
    blob = data[28 + json_length : 28 + json_length + bin_length]
    assert 28 + json_length + bin_length == len(data)
    return document, blob


COMPONENT_BYTES = {5121: 1, 5123: 2, 5125: 4, 5126: 4}
TYPE_COUNT = {"SCALAR": 1, "VEC2": 2, "VEC3": 3, "VEC4": 4}


def check_gltf(document: dict, blob: bytes) -> None:
    """The glTF 2.0 rules a loader relies on: versions, buffer bounds, alignment, bounds, indices."""
    assert document["asset"]["version"] == "2.0"
    assert document["buffers"] == [{"byteLength": len(blob)}]
    for view in document["bufferViews"]:
        assert view["byteOffset"] % 4 == 0
        assert view["byteOffset"] + view["byteLength"] <= len(blob)
    for accessor in document["accessors"]:
        view = document["bufferViews"][accessor["bufferView"]]
        size = accessor["count"] * COMPONENT_BYTES[accessor["componentType"]] * TYPE_COUNT[accessor["type"]]
        assert size == view["byteLength"]
    primitive = document["meshes"][0]["primitives"][0]
    positions = document["accessors"][primitive["attributes"]["POSITION"]]
    assert "min" in positions and "max" in positions
    vertex_count = positions["count"]
    for accessor_index in primitive["attributes"].values():
        assert document["accessors"][accessor_index]["count"] == vertex_count
    indices = document["accessors"][primitive["indices"]]
    view = document["bufferViews"][indices["bufferView"]]
    # The narrowest index type that addresses every vertex, 65535 being glTF's reserved restart value.
    assert indices["componentType"] == (5123 if vertex_count < 65535 else 5125)
    index_type = np.uint16 if indices["componentType"] == 5123 else np.uint32
    values = np.frombuffer(blob, index_type, indices["count"], view["byteOffset"])
    assert values.max() < vertex_count and indices["count"] % 3 == 0
    normal = document["accessors"][primitive["attributes"]["NORMAL"]]
    normals = np.frombuffer(blob, np.float32, normal["count"] * 3,
                            document["bufferViews"][normal["bufferView"]]["byteOffset"]).reshape(-1, 3)
    assert np.allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-4)


def test_glb_is_valid_gltf_with_the_texture_embedded(exported, textured: TexturedShape) -> None:
    document, blob = read_glb(exported.files["glb"])
    check_gltf(document, blob)
    primitive = document["meshes"][0]["primitives"][0]
    assert set(primitive["attributes"]) == {"POSITION", "NORMAL", "TEXCOORD_0"}
    image_view = document["bufferViews"][document["images"][0]["bufferView"]]
    jpeg = blob[image_view["byteOffset"] : image_view["byteOffset"] + image_view["byteLength"]]
    assert document["images"][0]["mimeType"] == "image/jpeg"
    decoded = np.asarray(Image.open(io.BytesIO(jpeg))).astype(int)
    assert decoded.shape == textured.texture.shape
    assert np.abs(decoded - textured.texture).mean() < 3  # JPEG at quality 90 on a photographic atlas
    assert document["materials"][0]["pbrMetallicRoughness"]["baseColorTexture"] == {"index": 0}
    # The texture is encoded once: the OBJ zip carries the same bytes.
    assert zipfile.ZipFile(io.BytesIO(exported.files["obj"])).read("texture.jpg") == jpeg
    loaded = trimesh.load(io.BytesIO(exported.files["glb"]), file_type="glb", force="mesh")
    assert isinstance(loaded.visual, trimesh.visual.TextureVisuals)
    assert loaded.visual.uv is not None and loaded.visual.material.baseColorTexture is not None


@pytest.mark.parametrize("fmt", ["glb", "obj", "stl", "ply"])
def test_a_format_written_later_from_the_source_is_the_same_file(exported, textured: TexturedShape, fmt) -> None:
    """A job writes one format and its source; any other format written on its first download is
    byte for byte what writing it with the job would have given."""
    alone = export_mesh(textured, face_count=8000, formats=(fmt,))
    assert set(alone.files) == {fmt}
    assert mesh_export.write_from_source(alone.source, fmt) == exported.files[fmt] == alone.files[fmt]
    other = "stl" if fmt != "stl" else "glb"
    assert mesh_export.write_from_source(alone.source, other) == exported.files[other]


@pytest.mark.parametrize("subdivisions", [5, 7])  # 10,242 and 163,842 vertices
def test_glb_indices_are_32_bit_only_where_16_bits_cannot_address_every_vertex(subdivisions: int) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    count = len(sphere.vertices)
    faces = sphere.faces.astype(np.int64)
    mesh = mesh_export._Mesh(
        vertices=sphere.vertices.astype(np.float32), faces=faces,
        normals=sphere.vertex_normals.astype(np.float32), colors=np.full((count, 4), 200, np.uint8),
        split_source=np.arange(count), split_faces=faces, split_uv=np.zeros((count, 2), np.float32),
        split_colors=np.full((count, 4), 200, np.uint8),
    )
    data = mesh_export._write_glb(mesh, None)
    document, blob = read_glb(data)
    check_gltf(document, blob)
    indices = document["accessors"][document["meshes"][0]["primitives"][0]["indices"]]
    assert indices["componentType"] == (5123 if subdivisions == 5 else 5125)
    loaded = trimesh.load(io.BytesIO(data), file_type="glb", force="mesh", process=False)
    assert np.array_equal(loaded.faces, sphere.faces)


def test_textured_glb_colours_follow_the_picture(exported) -> None:
    loaded = trimesh.load(io.BytesIO(exported.files["glb"]), file_type="glb", force="mesh")
    colours = loaded.visual.to_color().vertex_colors[:, :3].astype(int)
    front = loaded.vertices[:, 2] > 0.05
    left, right = front & (loaded.vertices[:, 0] < -0.2), front & (loaded.vertices[:, 0] > 0.2)
    assert colours[left, 0].mean() > colours[left, 2].mean() + 80  # red on the left
    assert colours[right, 2].mean() > colours[right, 0].mean() + 80  # blue on the right


def test_texture_off_writes_vertex_colours() -> None:
    exported = export_mesh(textured_blob(texture=False, resolution=96), face_count=3000)
    document, blob = read_glb(exported.files["glb"])
    check_gltf(document, blob)
    assert "images" not in document and "textures" not in document
    primitive = document["meshes"][0]["primitives"][0]
    assert set(primitive["attributes"]) == {"POSITION", "NORMAL", "COLOR_0"}
    colour = document["accessors"][primitive["attributes"]["COLOR_0"]]
    assert colour["componentType"] == 5121 and colour["normalized"] is True
    assert zipfile.ZipFile(io.BytesIO(exported.files["obj"])).namelist() == ["model.obj", "model.mtl"]
    for fmt in ("glb", "obj", "ply"):
        mesh = reload(exported, fmt)
        assert mesh.is_watertight  # nothing to split without a texture
        if fmt == "glb":  # trimesh keeps COLOR_0 beside the material that goes with it
            scene = trimesh.load(io.BytesIO(exported.files["glb"]), file_type="glb")
            (geometry,) = scene.geometry.values()
            colours = np.asarray(geometry.visual.vertex_attributes["color"])
        else:
            colours = mesh.visual.vertex_colors
        assert colours[:, :3].std() > 20  # real colours, not a flat default
    ply = trimesh.load(io.BytesIO(exported.files["ply"]), file_type="ply")
    assert ply.visual.kind == "vertex"


def test_ply_and_stl_are_binary(exported) -> None:
    assert exported.files["ply"].startswith(b"ply\nformat binary_little_endian 1.0\n")
    stl = exported.files["stl"]
    assert struct.unpack_from("<I", stl, 80)[0] == exported.faces
    assert len(stl) == 84 + 50 * exported.faces


def test_only_the_asked_formats_are_written(textured: TexturedShape) -> None:
    exported = export_mesh(textured, face_count=5000, formats=("stl",))
    assert set(exported.files) == {"stl"}
    with pytest.raises(InvalidArgument, match="^format:"):
        export_mesh(textured, face_count=5000, formats=("fbx",))


# ---------------------------------------------------------------------------------------------
# Decimation


def test_small_meshes_are_not_decimated(textured: TexturedShape) -> None:
    faces = len(textured.shape.faces)
    exported = export_mesh(textured, face_count=faces + 10, formats=("ply",))
    assert exported.faces == faces and exported.vertices == len(textured.shape.vertices)


def test_a_mesh_its_backend_built_within_the_budget_is_written_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inflate backend decimates within the job's face count and checks the result itself."""
    side = 400
    ys, xs = np.mgrid[:side, :side] + 0.5
    inside = (xs - 200) ** 2 + (ys - 200) ** 2 < 150**2
    rgb = np.full((side, side, 3), 180, np.uint8)
    loaded = LoadedImage(rgba=np.dstack([rgb, inside.astype(np.uint8) * 255]), has_alpha=True, source_format="PNG",
                         size=(side, side))
    prepared = prepare_image(loaded, remove_background="auto", foreground_ratio=0.85, resolution=160)
    (shape,) = get_backend("inflate").generate_batch(
        [ShapeItem(prepared, 0, 8000)], ShapeSettings(160, 50, 0.0), device=torch.device("cpu")
    )
    assert shape.checked_closed and len(shape.faces) <= 8000
    textured = synthesize_texture(shape, prepared, texture=True, texture_size=512, seed=0)

    def not_again(*_: object) -> bool:
        raise AssertionError("checked twice")

    monkeypatch.setattr(mesh_export, "is_closed_piece", not_again)
    exported = export_mesh(textured, face_count=8000, formats=("glb",))
    assert exported.faces == len(shape.faces) and exported.watertight
    mesh = merged(reload(exported, "glb"))
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.body_count == 1


def test_a_decimation_that_breaks_closure_is_retried_gentler(textured: TexturedShape) -> None:
    calls: list[tuple[int, float]] = []

    def breaks_at_full_strength(points, triangles, target, aggressiveness):  # type: ignore[no-untyped-def]
        calls.append((target, aggressiveness))
        out_points, out_faces = mesh_export.simplify(points, triangles, target, aggressiveness)
        return (out_points, out_faces[:-1]) if aggressiveness > 5 else (out_points, out_faces)

    _vertices, faces, closed = decimate_closed(textured.shape.vertices.astype(np.float64),
                                              textured.shape.faces, 4000, simplifier=breaks_at_full_strength)
    assert closed and is_closed(faces)
    assert calls == [(4000, 7.0), (4000, 5.0)]
    assert len(faces) <= 4000


def test_when_every_decimation_breaks_the_original_is_kept(textured: TexturedShape) -> None:
    def always_breaks(points, triangles, target, aggressiveness):  # type: ignore[no-untyped-def]
        out_points, out_faces = mesh_export.simplify(points, triangles, target, aggressiveness)
        return out_points, out_faces[:-1]

    _vertices, faces, closed = decimate_closed(textured.shape.vertices.astype(np.float64), textured.shape.faces, 4000,
                                              simplifier=always_breaks)
    assert closed and len(faces) == len(textured.shape.faces)


def test_a_pinched_decimation_is_caught_and_redone() -> None:
    """A real case: the thin rocket at resolution 128 pinches one edge at full aggressiveness."""
    import torch as _torch
    from skimage import data as samples

    from services.generation.pipeline.image_loading import load_image

    buffer = io.BytesIO()
    Image.fromarray(samples.rocket()).save(buffer, "JPEG")
    prepared = prepare_image(load_image(buffer.getvalue()), remove_background="auto", foreground_ratio=0.85,
                             resolution=128)
    (shape,) = get_backend("inflate").generate([prepared.grid_mask], steps=50, device=_torch.device("cpu"))
    vertices, faces, closed = decimate_closed(shape.vertices.astype(np.float64), shape.faces, 5000)
    assert closed and is_closed(faces) and len(faces) <= 5000
    mesh = trimesh.Trimesh(vertices, faces)
    assert mesh.is_watertight and mesh.body_count == 1


def test_closure_check() -> None:
    tetrahedron = np.array([[0, 2, 1], [0, 1, 3], [1, 2, 3], [0, 3, 2]])
    assert is_closed(tetrahedron)
    assert not is_closed(tetrahedron[:3])  # a hole
    flipped = tetrahedron.copy()
    flipped[0] = flipped[0, ::-1]
    assert not is_closed(flipped)  # inconsistent winding
    assert not is_closed(np.concatenate([tetrahedron, tetrahedron[:1]]))  # an edge with three faces
    assert not is_closed(np.zeros((0, 3), int))


# ---------------------------------------------------------------------------------------------
# OBJ text


def test_number_formatting_round_trips() -> None:
    values = np.array([0.0, -0.0, 0.5, -0.5, 0.1234564, -0.0000004, 12.75, -3.0000005, 1e-7], np.float64)
    text = _assemble([_decimal_columns(values), np.full((len(values), 1), ord("\n"), np.uint8)]).decode()
    parsed = np.array([float(line) for line in text.split()])
    assert np.allclose(parsed, values, atol=5e-7)
    assert "-0.000000" not in text  # no negative zero
    integers = np.array([1, 9, 10, 99, 100, 12345])
    text = _assemble([_integer_columns(integers, 6), np.full((6, 1), ord(" "), np.uint8)]).decode()
    assert text.split() == [str(i) for i in integers]
