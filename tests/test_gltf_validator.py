"""Every kind of GLB the service writes passes the Khronos glTF validator (npm gltf-validator, offline),
and every format reloads in trimesh as a closed mesh."""
from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import trimesh

from services.common.config import HunyuanConfig
from services.generation.backends.registry import BackendSet
from services.generation.pipeline.mesh_export import write_from_source
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.run import run_pipeline
from services.stack import ROOT
from tests.hunyuan_fixtures import tiny_model
from tests.images import photo_png

CASES = {
    "inflate-textured": GenerationParams(resolution=128, face_count=5000, texture_size=512, seed=1),
    "inflate-vertex-colours": GenerationParams(resolution=128, face_count=5000, texture=False, seed=1),
    "hunyuan3d-textured": GenerationParams(backend="hunyuan3d", resolution=64, steps=4, guidance_scale=5.0,
                                           face_count=1000, texture_size=256, seed=5),
    "hunyuan3d-vertex-colours": GenerationParams(backend="hunyuan3d", resolution=64, steps=4, guidance_scale=5.0,
                                                 face_count=1000, texture=False, seed=5),
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("gltf")
    backends = BackendSet.load(torch.device("cpu"), HunyuanConfig(model_path=str(tiny_model(folder / "m"))))
    picture = photo_png("astronaut", 256)
    return {name: run_pipeline(picture, params, backends=backends)[0] for name, params in CASES.items()}


def test_every_kind_of_glb_passes_the_khronos_validator(exports, tmp_path: Path) -> None:
    files = []
    for name, exported in exports.items():
        path = tmp_path / f"{name}.glb"
        path.write_bytes(exported.files["glb"])
        files.append(str(path))
    done = subprocess.run(["node", "scripts/validate_gltf.mjs", *files], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    reports = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(reports) == len(files), done.stderr
    for report in reports:
        assert report["errors"] == 0, report
    assert done.returncode == 0


@pytest.mark.parametrize("fmt", ["obj", "stl", "ply"])
def test_every_other_format_reloads_closed_in_trimesh(exports, fmt: str) -> None:
    for name, exported in exports.items():
        data = write_from_source(exported.source, fmt)
        if fmt == "obj":
            archive = zipfile.ZipFile(io.BytesIO(data))
            mesh = trimesh.load(io.BytesIO(archive.read("model.obj")), file_type="obj", force="mesh",
                                resolver=trimesh.resolvers.ZipResolver(archive))
        else:
            mesh = trimesh.load(io.BytesIO(data), file_type=fmt, force="mesh")
        mesh.merge_vertices(merge_tex=True, merge_norm=True)
        assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0, (name, fmt)
        assert len(mesh.faces) == exported.faces, (name, fmt)
