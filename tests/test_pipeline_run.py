"""The whole pipeline in-process: accuracy at default settings, every stage timed, refusals."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import trimesh
from PIL import Image
from skimage import data as samples
from skimage.transform import resize

from services.common.errors import InvalidArgument
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import STAGES
from services.generation.pipeline.run import run_pipeline


def encode(picture: np.ndarray, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def disk_picture(side: int = 512, radius_share: float = 0.35, rgba: bool = False) -> np.ndarray:
    ys, xs = np.mgrid[:side, :side] + 0.5
    inside = (xs - side / 2) ** 2 + (ys - side / 2) ** 2 < (radius_share * side) ** 2
    if rgba:
        picture = np.zeros((side, side, 4), np.uint8)
        picture[..., :3] = (180, 120, 60)
        picture[..., 3] = inside * 255
        return picture
    return np.where(inside, 255, 0).astype(np.uint8)[..., None].repeat(3, axis=2)


def astronaut_512_png() -> bytes:
    return encode(samples.astronaut())


def reload_merged(files: dict[str, bytes], fmt: str) -> trimesh.Trimesh:
    data = files[fmt]
    if fmt == "obj":
        archive = zipfile.ZipFile(io.BytesIO(data))
        mesh = trimesh.load(io.BytesIO(archive.read("model.obj")), file_type="obj", force="mesh",
                            resolver=trimesh.resolvers.ZipResolver(archive))
    else:
        mesh = trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh")
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


@pytest.mark.parametrize("rgba", [False, True], ids=["white-disk-on-black", "rgba-disk"])
def test_a_disk_becomes_a_sphere_at_default_settings(rgba: bool) -> None:
    exported, _ = run_pipeline(encode(disk_picture(rgba=rgba)), GenerationParams())
    assert exported.faces <= 40_000 and exported.watertight
    width, height, depth = exported.extents
    assert abs(depth / width - 1) < 0.05 and abs(height / width - 1) < 0.01
    assert abs(exported.volume / (width * height * depth) - np.pi / 6) < 0.03 * np.pi / 6
    # The same numbers from the file itself.
    mesh = reload_merged(exported.files, "glb")
    assert mesh.is_watertight
    assert abs(mesh.volume / np.prod(mesh.extents) - np.pi / 6) < 0.03 * np.pi / 6


def test_a_photo_through_every_stage_at_default_settings() -> None:
    exported, timings = run_pipeline(astronaut_512_png(), GenerationParams(), formats=("glb", "obj", "stl", "ply"))
    assert list(timings) == list(STAGES)
    assert all(seconds > 0 for seconds in timings.values())
    assert set(exported.files) == {"glb", "obj", "stl", "ply"}
    assert 36_000 <= exported.faces <= 40_000
    assert exported.watertight and exported.volume > 0
    assert max(exported.extents) == pytest.approx(1.0)
    for fmt in ("glb", "obj", "stl", "ply"):
        mesh = reload_merged(exported.files, fmt)
        assert mesh.is_watertight and mesh.is_winding_consistent, fmt
        assert mesh.body_count == 1, fmt


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("coffee", "JPEG"), ("chelsea", "WEBP"), ("rocket", "JPEG"), ("logo", "PNG"), ("horse", "GIF")],
)
def test_sample_photos_in_several_encodings(name: str, fmt: str) -> None:
    picture = getattr(samples, name)()
    if picture.dtype == bool:
        picture = np.where(picture, 255, 0).astype(np.uint8)
    if fmt == "JPEG" and picture.shape[-1] == 4:
        picture = picture[..., :3]
    params = GenerationParams(resolution=128, face_count=5000, texture_size=512, format="ply")
    exported, _ = run_pipeline(encode(picture, fmt), params)
    assert exported.watertight and exported.faces <= 5000
    assert reload_merged(exported.files, "ply").is_watertight


def test_the_same_input_gives_the_same_files() -> None:
    data = encode((resize(samples.chelsea(), (256, 256)) * 255).astype(np.uint8))
    params = GenerationParams(resolution=96, face_count=3000, texture_size=256, seed=11)
    first, _ = run_pipeline(data, params)
    second, _ = run_pipeline(data, params)
    assert first.files == second.files


def test_texture_off_and_small_settings() -> None:
    params = GenerationParams(resolution=64, steps=1, face_count=1000, texture=False, texture_size=256,
                              foreground_ratio=1.0, remove_background="off")
    exported, _ = run_pipeline(encode(samples.coffee()), params)
    assert exported.watertight and exported.faces <= 1000


def test_invalid_parameters_name_their_field() -> None:
    with pytest.raises(InvalidArgument, match="^resolution:"):
        run_pipeline(encode(disk_picture()), GenerationParams(resolution=5000))
    with pytest.raises(InvalidArgument, match="^backend:"):
        run_pipeline(encode(disk_picture()), GenerationParams(backend="nerf"))


@pytest.mark.parametrize(
    "data",
    [b"", b"not a picture", encode(np.full((128, 128, 3), 255, np.uint8)), encode(np.zeros((64, 64, 4), np.uint8))],
    ids=["empty", "text", "plain-white", "fully-transparent"],
)
def test_bad_pictures_fail_with_an_image_error(data: bytes) -> None:
    with pytest.raises(InvalidArgument, match="^image: "):
        run_pipeline(data, GenerationParams())
