"""The hunyuan3d backend in-process: loading (and why it fails), one batched call, the surface, the atlas.

Every model here is a tiny random-weight Hunyuan3D-2 written into a temporary
folder by hy3dgen's own classes and loaded through hy3dgen's real loader.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
import yaml

from services.common.config import HunyuanConfig
from services.common.errors import Cancelled, FailedPrecondition, InvalidArgument
from services.generation.backends.base import BatchTimings, ShapeItem, ShapeSettings
from services.generation.backends.hunyuan3d import WEIGHTS_FILE, fit_to_silhouette
from services.generation.backends.registry import BackendSet
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.mesh_export import export_mesh, is_closed
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import Shape
from services.generation.pipeline.run import run_pipeline
from services.generation.pipeline.surface import EmptySurface, extract_surface
from services.generation.pipeline.texture_synthesis import synthesize_texture
from services.generation.pipeline.uv_atlas import rasterize_uv
from tests.hunyuan_fixtures import tiny_model
from tests.images import disk_png, photo_png

CPU = torch.device("cpu")
# Below the API's minimum (64) on purpose: the backend takes any size, and 32 keeps these tests quick.
SETTINGS = ShapeSettings(resolution=32, steps=4, guidance_scale=5.0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("hunyuan") / "tiny")


@pytest.fixture(scope="module")
def backends(model_dir: Path) -> BackendSet:
    return BackendSet.load(CPU, HunyuanConfig(model_path=str(model_dir)))


@pytest.fixture(scope="module")
def picture():
    return prepare_image(load_image(photo_png("astronaut", 256)), remove_background="auto", foreground_ratio=0.85,
                         resolution=64)


def status(backends: BackendSet, name: str = "hunyuan3d"):
    return next(s for s in backends.statuses() if s.name == name)


# ---------------------------------------------------------------------------------------------
# Loading


def test_a_written_checkpoint_loads_through_hy3dgen_and_the_hub_stays_offline(backends: BackendSet,
                                                                                model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / WEIGHTS_FILE), "pt") as weights:
        prefixes = {key.split(".")[0] for key in weights.keys()}
        assert weights.get_tensor(next(iter(weights.keys()))).dtype == torch.float16
    assert prefixes == {"model", "vae", "conditioner"}
    assert status(backends).state == "ready" and status(backends).reason == ""
    assert status(backends).precision == "fp32"  # on the CPU
    assert status(backends, "inflate").is_default and not status(backends).is_default
    backend = backends.get("hunyuan3d", CPU)
    assert backend.pipeline.dtype == torch.float32 and backend.pipeline.device == CPU
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def _broken(tmp_path: Path, model_dir: Path, how: str) -> str:
    folder = tmp_path / how
    folder.mkdir()
    config = (model_dir / "config.yaml").read_text()
    weights = (model_dir / WEIGHTS_FILE).read_bytes()
    if how != "no-config":
        (folder / "config.yaml").write_text(config)
    if how != "no-weights":
        (folder / WEIGHTS_FILE).write_bytes(weights)
    if how == "corrupt":
        (folder / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 3])
    elif how == "wrong-architecture":
        spec = yaml.safe_load(config)
        spec["model"]["params"]["hidden_size"] = 64
        spec["model"]["params"]["axes_dim"] = [32]
        (folder / "config.yaml").write_text(yaml.safe_dump(spec))
    elif how == "bad-yaml":
        (folder / "config.yaml").write_text("model: [unclosed")
    elif how == "foreign-class":
        spec = yaml.safe_load(config)
        spec["scheduler"]["target"] = "os.system"
        (folder / "config.yaml").write_text(yaml.safe_dump(spec))
    return str(folder)


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("unset", "HUNYUAN3D_MODEL_PATH is not set"),
        ("not-a-folder", "is not a folder"),
        ("no-config", "config.yaml is missing"),
        ("no-weights", f"{WEIGHTS_FILE} are missing"),
        ("bad-yaml", "config.yaml is not valid"),
        ("foreign-class", "is not a class of hy3dgen.shapegen"),
        ("corrupt", "could not be loaded"),
        ("wrong-architecture", "could not be loaded"),
    ],
)
def test_missing_or_broken_weights_leave_a_reason_and_inflate_ready(tmp_path: Path, model_dir: Path, how: str,
                                                                    reason: str) -> None:
    given = {"unset": "", "not-a-folder": str(tmp_path / "nowhere")}
    path = given[how] if how in given else _broken(tmp_path, model_dir, how)
    backends = BackendSet.load(CPU, HunyuanConfig(model_path=path))
    assert status(backends).state == "unavailable"
    assert reason in status(backends).reason
    if path:
        assert path in status(backends).reason  # the reason names where it looked
    with pytest.raises(FailedPrecondition, match=f"^backend: hunyuan3d is not available: .*{reason}"):
        backends.get("hunyuan3d")
    assert status(backends, "inflate").state == "ready"
    assert backends.get("inflate") is not None
    with pytest.raises(InvalidArgument, match="^backend: "):
        backends.require_ready("nerf")


def test_loading_on_a_thread_reports_loading_then_ready(model_dir: Path) -> None:
    backends = BackendSet.start_loading(CPU, HunyuanConfig(model_path=str(model_dir)))
    assert status(backends, "inflate").state == "ready"
    backends.wait_loaded(60)
    assert status(backends).state == "ready"


# ---------------------------------------------------------------------------------------------
# One batched call


def test_a_batch_runs_in_one_call_with_per_step_progress_and_substages(backends: BackendSet, picture) -> None:
    backend = backends.get("hunyuan3d")
    events: list[tuple[float, str]] = []
    timings = BatchTimings()
    shapes = backend.generate_batch(
        [ShapeItem(picture, seed, 1000) for seed in (1, 2, 3)], SETTINGS, device=CPU,
        progress=lambda fraction, detail: events.append((fraction, detail)), timings=timings,
    )
    assert len(shapes) == 3
    for shape in shapes:
        assert isinstance(shape, Shape) and shape.texture_mapping == "atlas" and shape.face_budget == 1000
        assert is_closed(shape.faces) and len(shape.faces) > 100
    details = [d for _, d in events]
    assert [d for d in details if d.startswith("denoising step")] == [
        f"denoising step {k} of {SETTINGS.steps}" for k in range(SETTINGS.steps + 1)
    ]
    assert any(d.startswith("decoding chunk") for d in details)
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert set(timings.substages) == {"denoising", "volume_decoding", "surface_extraction"}
    assert all(seconds > 0 for seconds in timings.substages.values())


def test_an_items_noise_depends_on_its_own_seed_only(backends: BackendSet, picture) -> None:
    backend = backends.get("hunyuan3d")
    alone = backend.generate_batch([ShapeItem(picture, 7)], SETTINGS, device=CPU)[0]
    again = backend.generate_batch([ShapeItem(picture, 7)], SETTINGS, device=CPU)[0]
    other = backend.generate_batch([ShapeItem(picture, 8)], SETTINGS, device=CPU)[0]
    assert np.array_equal(alone.vertices, again.vertices) and np.array_equal(alone.faces, again.faces)
    assert not (len(alone.vertices) == len(other.vertices) and np.array_equal(alone.vertices, other.vertices))


def test_a_stop_between_steps_ends_the_call_and_the_pipeline_stays_usable(backends: BackendSet, picture) -> None:
    backend = backends.get("hunyuan3d")
    details: list[str] = []
    with pytest.raises(Cancelled):
        backend.generate_batch(
            [ShapeItem(picture, 1)], ShapeSettings(32, 50, 5.0), device=CPU,
            progress=lambda _f, detail: details.append(detail),
            should_stop=lambda: any(d == "denoising step 3 of 50" for d in details),
        )
    assert details[-1] == "denoising step 3 of 50"  # stopped right after the step that asked
    # The scheduler's state from the stopped call does not leak into the next one.
    after = backend.generate_batch([ShapeItem(picture, 7)], SETTINGS, device=CPU)[0]
    fresh = BackendSet.load(CPU, backend.config).get("hunyuan3d").generate_batch(
        [ShapeItem(picture, 7)], SETTINGS, device=CPU
    )[0]
    assert np.array_equal(after.vertices, fresh.vertices)


def test_an_empty_surface_fails_its_item_only(tmp_path: Path, picture) -> None:
    empty = BackendSet.load(CPU, HunyuanConfig(model_path=str(tiny_model(tmp_path / "empty",
                                                                          zero_geometry_output=True))))
    (result,) = empty.get("hunyuan3d").generate_batch([ShapeItem(picture, 1)], SETTINGS, device=CPU)
    assert isinstance(result, InvalidArgument)
    assert result.message.startswith("image: the model found no surface")


def test_the_whole_pipeline_exports_a_closed_textured_mesh(backends: BackendSet) -> None:
    substages: dict[str, float] = {}
    params = GenerationParams(backend="hunyuan3d", resolution=64, steps=4, guidance_scale=5.0, face_count=1000,
                              texture_size=256, seed=5)
    exported, timings = run_pipeline(disk_png(), params, backends=backends, substages=substages)
    assert list(timings) == ["image_loading", "image_preprocessing", "shape_generation", "texture_synthesis",
                             "mesh_export"]
    assert {"denoising", "volume_decoding"} <= set(substages)
    assert exported.watertight and exported.faces <= 1000 and exported.volume > 0
    mesh = trimesh.load(io.BytesIO(exported.files["glb"]), file_type="glb", force="mesh")
    assert len(mesh.faces) == exported.faces
    assert mesh.visual.uv is not None and mesh.visual.material.baseColorTexture is not None
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_memory_estimate_grows_with_the_volume(backends: BackendSet) -> None:
    backend = backends.get("hunyuan3d")
    small, large = backend.estimate_item_bytes(64, 30), backend.estimate_item_bytes(256, 30)
    assert 0 < small < large
    assert backend.estimate_item_bytes(256, 5) == large  # steps do not change the peak


# ---------------------------------------------------------------------------------------------
# Surface, frame and atlas (no model needed)


def _ball(n: int, radius: float, bound: float = 1.01) -> np.ndarray:
    axis = np.linspace(-bound, bound, n)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    return (radius - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32) * 10


def test_a_surface_touching_the_bounds_is_closed_by_the_padding() -> None:
    vertices, faces = extract_surface(_ball(33, 1.4), bound=1.01)
    assert is_closed(faces)
    assert vertices.max() > 1.0  # capped at the grid's edge, not left open
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.volume > 0  # wound outward


def test_floaters_are_dropped_and_an_empty_volume_is_refused() -> None:
    volume = _ball(33, 0.6)
    volume[1:4, 1:4, 1:4] = 5.0  # a speck in a corner
    vertices, faces = extract_surface(volume, bound=1.01)
    assert trimesh.Trimesh(vertices, faces, process=False).body_count == 1
    assert np.abs(vertices).max() < 0.7
    with pytest.raises(EmptySurface):
        extract_surface(np.zeros((17, 17, 17), np.float32), bound=1.01)
    with pytest.raises(EmptySurface):
        extract_surface(np.full((17, 17, 17), np.nan, np.float32), bound=1.01)


def test_the_mesh_is_fitted_onto_the_silhouette() -> None:
    mask = np.zeros((100, 100), bool)
    mask[20:80, 30:60] = True  # 30 wide, 60 tall
    vertices = np.array([[-1, -2, -1], [1, 2, 1], [0, 0, 0]], np.float32)
    fitted = fit_to_silhouette(vertices, mask)
    assert fitted[:, 1].min() == pytest.approx(0.5 - 0.80) and fitted[:, 1].max() == pytest.approx(0.5 - 0.20)
    assert fitted[:, 0].min() == pytest.approx(-0.5 + 0.30) and fitted[:, 0].max() == pytest.approx(-0.5 + 0.60)
    assert fitted[:, 2].min() == pytest.approx(-fitted[:, 2].max())


def test_an_atlas_shape_is_decimated_unwrapped_and_baked_from_the_picture() -> None:
    picture = prepare_image(load_image(disk_png(256)), remove_background="auto", foreground_ratio=0.85,
                            resolution=64)
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=0.5)
    shape = Shape(vertices=fit_to_silhouette(sphere.vertices.astype(np.float32), picture.mask),
                  faces=sphere.faces.astype(np.int64), texture_mapping="atlas", face_budget=1000)
    textured = synthesize_texture(shape, picture, texture=True, texture_size=256, seed=0)
    layout = textured.uv_layout
    assert layout is not None and len(textured.shape.faces) <= 1000
    assert np.array_equal(layout.split_source[layout.split_faces], textured.shape.faces)
    covered = rasterize_uv(layout.split_uv, layout.split_faces, 256)[0] >= 0
    assert covered.mean() > 0.3
    # The disk is orange (230, 120, 40); the front of the ball is the picture, the back a darker guess.
    front = textured.vertex_colors[textured.shape.vertices[:, 2] > 0.2, :3].astype(float)
    back = textured.vertex_colors[textured.shape.vertices[:, 2] < -0.2, :3].astype(float)
    assert np.abs(front.mean(0) - (230, 120, 40)).max() < 25
    assert back.mean() < front.mean()

    exported = export_mesh(textured, face_count=1000)
    assert exported.faces == len(textured.shape.faces)  # written as it is, not decimated again
    mesh = trimesh.load(io.BytesIO(exported.files["glb"]), file_type="glb", force="mesh")
    assert len(mesh.vertices) == len(layout.split_source)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    assert mesh.is_watertight

    plain = synthesize_texture(shape, picture, texture=False, texture_size=256, seed=0)
    assert plain.texture is None and plain.uv_layout is None
    assert np.array_equal(plain.vertex_colors, textured.vertex_colors)
    assert export_mesh(plain, face_count=1000).watertight
