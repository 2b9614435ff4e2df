"""The whole pipeline in-process for one job: benchmarks and tests use it, the
worker runs the same stages with batching and events around them."""
from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from services.common.errors import ServiceError
from services.generation.backends.base import BatchTimings, ShapeItem, ShapeSettings
from services.generation.backends.registry import BackendSet
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.mesh_export import export_mesh
from services.generation.pipeline.params import GenerationParams, validate
from services.generation.pipeline.records import ExportedMesh
from services.generation.pipeline.texture_synthesis import synthesize_texture


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_pipeline(
    data: bytes,
    params: GenerationParams,
    device: torch.device | None = None,
    backends: BackendSet | None = None,
    substages: dict[str, float] | None = None,
    formats: Sequence[str] | None = None,
) -> tuple[ExportedMesh, dict[str, float]]:
    """Run the five stages; returns the export and each stage's seconds.

    formats: what mesh_export writes; by default the job's own format only, as the service does
    (the source in the export writes any other).

    backends: the loaded backends to use (hunyuan3d needs them); by default inflate only.
    substages: filled, when given, with the backend's own parts of shape_generation in seconds
    ({"denoising": ..., "volume_decoding": ..., "surface_extraction": ...} for hunyuan3d).
    """
    params = validate(params)
    device = device or (backends.device if backends is not None else default_device())
    backend = (backends or BackendSet(device)).get(params.backend, device)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    loaded = load_image(data)
    timings["image_loading"] = _lap(start)

    start = time.perf_counter()
    prepared = prepare_image(
        loaded,
        remove_background=params.remove_background,
        foreground_ratio=params.foreground_ratio,
        resolution=params.resolution,
    )
    timings["image_preprocessing"] = _lap(start)

    start = time.perf_counter()
    measured = BatchTimings()
    (shape,) = backend.generate_batch(
        [ShapeItem(prepared, params.seed, params.face_count)],
        ShapeSettings(params.resolution, params.steps, params.guidance_scale),
        device=device,
        timings=measured,
    )
    timings["shape_generation"] = _lap(start)
    if isinstance(shape, ServiceError):
        raise shape
    if substages is not None:
        substages.update(measured.substages)

    start = time.perf_counter()
    textured = synthesize_texture(
        shape, prepared, texture=params.texture, texture_size=params.texture_size, seed=params.seed
    )
    timings["texture_synthesis"] = _lap(start)

    start = time.perf_counter()
    exported = export_mesh(textured, face_count=params.face_count, formats=formats or (params.format,))
    timings["mesh_export"] = _lap(start)
    return exported, timings


def _lap(start: float) -> float:
    return time.perf_counter() - start
