"""The mesh writers: this project's against trimesh's, format by format, and what a job's export costs.

    .venv/bin/python -m bench.exporters              # prints the table, updates its section of bench/RESULTS.md
    .venv/bin/python -m bench.exporters --no-write

One default job's mesh (the 512-px astronaut at resolution 256, decimated to 40,000 faces, 1024² texture),
each writer timed on the same arrays in one process, alternately; medians of `repeats` runs. The
hand-written STL and PLY writers are the ones at REFERENCE_COMMIT, loaded from git, since trimesh's
replaced them; GLB and OBJ stay hand-written because they are faster than trimesh's (which re-encodes
the texture and formats OBJ lines in Python).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image

from bench.common import BENCH_DIR, ROOT, machine_line, write_section
from services.generation.backends.registry import get_backend
from services.generation.pipeline import mesh_export
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.texture_synthesis import synthesize_texture
from tests.images import photo_png

# The last commit with every writer hand-written and all four formats written by every job.
REFERENCE_COMMIT = "70b5177"
SECTION_TITLE = "## Mesh writers and texture encoding"


def _reference() -> ModuleType:
    source = subprocess.run(
        ["git", "show", f"{REFERENCE_COMMIT}:services/generation/pipeline/mesh_export.py"],
        cwd=ROOT, check=True, capture_output=True, text=True,
    ).stdout
    with tempfile.TemporaryDirectory(prefix="exporters-reference-") as folder:
        path = Path(folder) / "mesh_export_reference.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location("mesh_export_reference", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1000


def run(repeats: int = 7) -> dict[str, Any]:
    picture = prepare_image(load_image(photo_png("astronaut", 512)), remove_background="auto",
                            foreground_ratio=0.85, resolution=256)
    (shape,) = get_backend("inflate").generate([picture.grid_mask], steps=50, device=torch.device("cpu"))
    textured = synthesize_texture(shape, picture, texture=True, texture_size=1024, seed=0)
    vertices, faces, _ = mesh_export.decimate_closed(
        textured.shape.vertices.astype(np.float64), textured.shape.faces.astype(np.int64), 40_000
    )
    mesh = mesh_export._map_and_normalise(vertices, faces, textured)  # noqa: SLF001 - the writers' own input
    reference = _reference()
    old_mesh = reference._Mesh(**{k: getattr(mesh, k) for k in mesh_export._SOURCE_FIELDS})  # noqa: SLF001
    texture = textured.texture
    assert texture is not None
    jpeg = mesh_export._encode_jpeg(texture)  # noqa: SLF001
    png = reference._encode_png(texture)  # noqa: SLF001
    image = Image.fromarray(texture)
    textured_trimesh = trimesh.Trimesh(
        mesh.vertices[mesh.split_source], mesh.split_faces, vertex_normals=mesh.normals[mesh.split_source],
        visual=trimesh.visual.TextureVisuals(uv=np.c_[mesh.split_uv[:, 0], 1 - mesh.split_uv[:, 1]], image=image),
        process=False,
    )
    plain_trimesh = mesh_export._trimesh_of(mesh)  # noqa: SLF001

    encoding = {
        "png_ms": _median_ms(lambda: reference._encode_png(texture), repeats),  # noqa: SLF001
        "jpeg_ms": _median_ms(lambda: mesh_export._encode_jpeg(texture), repeats),  # noqa: SLF001
        "png_bytes": len(png),
        "jpeg_bytes": len(jpeg),
    }
    writers = {
        "glb": {"hand_ms": _median_ms(lambda: mesh_export._write_glb(mesh, jpeg), repeats),  # noqa: SLF001
                "trimesh_ms": _median_ms(lambda: textured_trimesh.export(file_type="glb"), repeats),
                "chosen": "hand"},
        "obj": {"hand_ms": _median_ms(lambda: mesh_export._write_obj_zip(mesh, jpeg), repeats),  # noqa: SLF001
                "trimesh_ms": _median_ms(lambda: textured_trimesh.export(file_type="obj"), max(3, repeats // 2)),
                "chosen": "hand"},
        "stl": {"hand_ms": _median_ms(lambda: reference._write_stl(old_mesh), repeats),  # noqa: SLF001
                "trimesh_ms": _median_ms(lambda: plain_trimesh.export(file_type="stl"), repeats),
                "chosen": "trimesh"},
        "ply": {"hand_ms": _median_ms(lambda: reference._write_ply(old_mesh), repeats),  # noqa: SLF001
                "trimesh_ms": _median_ms(
                    lambda: plain_trimesh.export(file_type="ply", encoding="binary", vertex_normal=True), repeats),
                "chosen": "trimesh"},
    }
    job = {
        "all_four_before_ms": _median_ms(lambda: reference.export_mesh(textured, face_count=40_000), repeats),
        "glb_only_now_ms": _median_ms(
            lambda: mesh_export.export_mesh(textured, face_count=40_000, formats=("glb",)), repeats),
    }
    return {"repeats": repeats, "faces": len(mesh.faces), "encoding": encoding, "writers": writers, "job": job,
            "reference": REFERENCE_COMMIT}


def summary_rows(result: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    job = result["job"]
    return [
        ("mesh_export of a default job: the asked-for format only, now (before: all four, "
         f"{job['all_four_before_ms']:.0f} ms)", f"{job['glb_only_now_ms']:.0f} ms", "—", "—"),
    ]


def markdown(result: dict[str, Any], command: str | None = None, machine_line: str | None = None) -> list[str]:
    enc, writers, job = result["encoding"], result["writers"], result["job"]
    lines = [SECTION_TITLE, ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    if machine_line:
        lines += [f"Machine: {machine_line}", ""]
    lines += [
        f"One default job's mesh ({result['faces']:,} faces, 1024² texture), medians of {result['repeats']} runs; "
        f"the hand-written STL and PLY writers and the PNG encoder are those of commit {result['reference']}.",
        "",
        "| format | hand-written | trimesh | written with |",
        "| --- | --- | --- | --- |",
    ]
    for fmt, row in writers.items():
        lines.append(f"| {fmt.upper()} | {row['hand_ms']:.1f} ms | {row['trimesh_ms']:.1f} ms | {row['chosen']} |")
    lines += [
        "",
        f"Texture: PNG (level 1) {enc['png_ms']:.1f} ms, {enc['png_bytes'] / 1024:.0f} KiB; "
        f"JPEG (quality 90) {enc['jpeg_ms']:.1f} ms, {enc['jpeg_bytes'] / 1024:.0f} KiB: textures are JPEG now.",
        "",
        f"A job's mesh_export: all four formats, as every job wrote them before, {job['all_four_before_ms']:.0f} ms; "
        f"the asked-for GLB only (the others are written from the job's source on first download) "
        f"{job['glb_only_now_ms']:.0f} ms.",
        "",
        "trimesh writes STL and PLY within noise of (or faster than) the hand-written writers, so it does; "
        "its GLB writer re-encodes the texture and its OBJ writer formats lines in Python, both several times "
        "slower, so those two stay hand-written. Every GLB passes the Khronos glTF validator "
        "(tests/test_gltf_validator.py) and every format reloads closed in trimesh.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    line = machine_line()
    result = run(args.repeats)
    section = "\n".join(markdown(result, ".venv/bin/python -m bench.exporters", line))
    print(section)
    if not args.no_write:
        write_section(BENCH_DIR / "RESULTS.md", SECTION_TITLE, section)


if __name__ == "__main__":
    main()
