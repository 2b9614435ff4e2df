"""Hunyuan3D-2 Turbo, mini and FlashVDM in-process: the variant read from the config and its defaults, a
separate VAE folder (and why one fails), the lightning decoder (progress per chunk, stops between chunks,
closed meshes, a batch in one call), the filling of the points it skips, and the FlashVDM recommendation.

Every model is a tiny random-weight folder written by hy3dgen's own classes and loaded through the real
loading code; the service path is in test_hunyuan3d_turbo_service.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common.config import HunyuanConfig
from services.common.errors import Cancelled
from services.generation.backends.base import BatchTimings, ShapeItem, ShapeSettings
from services.generation.backends.hunyuan3d import WEIGHTS_FILE
from services.generation.backends.hunyuan3d_checkpoint import CONFIGS, VAE_CONFIGS, write_vae_checkpoint
from services.generation.backends.hunyuan3d_decoding import fill_unevaluated
from services.generation.backends.hunyuan3d_variant import telemetry_name, variant_of
from services.generation.backends.registry import BackendSet, BackendStatus
from services.generation.convert import params_from_request
from services.generation.pipeline.image_loading import load_image
from services.generation.pipeline.image_preprocessing import prepare_image
from services.generation.pipeline.mesh_export import is_closed
from services.generation.pipeline.params import variant_parameters
from services.generation.pipeline.records import Shape
from services.generation.pipeline.surface import EmptySurface, extract_surface
from tests.hunyuan_fixtures import tiny_turbo_model, tiny_turbo_vae
from tests.images import photo_png

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("turbo")
    return tiny_turbo_model(tmp / "model"), tiny_turbo_vae(tmp / "vae")


@pytest.fixture(scope="module")
def lightning(folders: tuple[Path, Path]) -> BackendSet:
    model, vae = folders
    return BackendSet.load(CPU, HunyuanConfig(model_path=str(model), vae_path=str(vae), flashvdm=True))


@pytest.fixture(scope="module")
def picture():
    return prepare_image(load_image(photo_png("astronaut", 256)), remove_background="auto", foreground_ratio=0.85,
                         resolution=64)


def status(backends: BackendSet, name: str = "hunyuan3d") -> BackendStatus:
    return next(s for s in backends.statuses() if s.name == name)


# ---------------------------------------------------------------------------------------------
# Variants


@pytest.mark.parametrize(
    ("config", "variant", "steps"),
    [
        ("tiny", "standard", 30),
        ("tiny-turbo", "turbo", 5),
        ("published", "standard", 30),
        ("published-turbo", "turbo", 5),
        ("published-mini", "mini", 30),
        ("published-mini-turbo", "mini-turbo", 5),
    ],
)
def test_the_variant_and_its_default_steps_come_from_the_config(config: str, variant: str, steps: int) -> None:
    assert variant_of(CONFIGS[config]) == variant
    assert variant_parameters("hunyuan3d", variant).steps.default == steps
    # Only the default moves: the range stays the backend's.
    assert variant_parameters("hunyuan3d", variant).steps.maximum == 100


def test_guidance_distilled_models_and_unreadable_configs() -> None:
    fast = copy.deepcopy(CONFIGS["published"])
    fast["model"]["params"]["guidance_embed"] = True  # the flow-matching scheduler stays: guidance distillation
    assert variant_of(fast) == "fast"
    mini_fast = copy.deepcopy(CONFIGS["published-mini"])
    mini_fast["model"]["params"]["guidance_embed"] = True
    assert variant_of(mini_fast) == "mini-fast"
    assert variant_of({}) == "standard"
    assert variant_parameters("hunyuan3d", "").steps.default == 30
    assert telemetry_name("hunyuan3d", "standard", False) == "hunyuan3d"
    assert telemetry_name("hunyuan3d", "mini-turbo", True) == "hunyuan3d.mini-turbo.flashvdm"


def test_a_turbo_folder_with_a_separate_vae_and_flashvdm_loads(lightning: BackendSet,
                                                               folders: tuple[Path, Path]) -> None:
    from hy3dgen.shapegen.models.autoencoders import FlashVDMVolumeDecoding

    loaded = status(lightning)
    assert loaded.state == "ready" and loaded.variant == "turbo"
    assert loaded.parameters.steps.default == 5 and loaded.parameters.guidance_scale.default == 5.0
    assert status(lightning, "inflate").variant == ""
    assert lightning.telemetry_name("hunyuan3d") == "hunyuan3d.turbo.flashvdm"
    assert lightning.telemetry_name("inflate") == "inflate"
    backend = lightning.get("hunyuan3d")
    vae = backend.pipeline.vae
    assert isinstance(vae.volume_decoder, FlashVDMVolumeDecoding)
    # The VAE is the separate folder's (a lighter geometry decoder), not the model folder's own.
    assert vae.geo_decoder.downsample_ratio == 2
    with safe_open(str(folders[1] / WEIGHTS_FILE), "pt") as weights:
        expected = weights.get_tensor("geo_decoder.output_proj.weight")
    assert torch.equal(vae.geo_decoder.output_proj.weight, expected.float())
    # Guidance embedded: one pass per step, not a doubled batch.
    assert not backend.dimensions.classifier_free_guidance


def test_requests_get_the_loaded_variants_defaults(lightning: BackendSet) -> None:
    request = pb.GenerateRequest(backend="hunyuan3d", image=b"-")
    assert params_from_request(request, lightning.statuses()).steps == 5
    assert params_from_request(pb.GenerateRequest(backend="hunyuan3d", image=b"-", steps=12),
                               lightning.statuses()).steps == 12
    assert params_from_request(request).steps == 30  # without the statuses: the backend's own default


def _vae_folder(tmp_path: Path, folders: tuple[Path, Path], how: str) -> Path:
    folder = tmp_path / how
    if how == "whole-model":
        return folders[0]
    if how == "other-latents":
        spec = copy.deepcopy(VAE_CONFIGS["tiny-turbo"])
        spec["params"]["num_latents"] = 32
        return write_vae_checkpoint(folder, spec)
    folder.mkdir()
    (folder / "config.yaml").write_text((folders[1] / "config.yaml").read_text())
    weights = (folders[1] / WEIGHTS_FILE).read_bytes()
    if how == "corrupt":
        (folder / WEIGHTS_FILE).write_bytes(weights[: len(weights) // 2])
    return folder


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("not-a-folder", "HUNYUAN3D_VAE_PATH="),
        ("no-weights", f"VAE weights at {{folder}}/{WEIGHTS_FILE} are missing"),
        ("corrupt", f"VAE weights at {{folder}}/{WEIGHTS_FILE} could not be loaded"),
        ("whole-model", "holds a whole model, not a VAE folder"),
        ("other-latents", "takes latents of shape (32, 8), the model makes (64, 8)"),
    ],
)
def test_a_broken_vae_folder_is_the_reason_and_inflate_serves(tmp_path: Path, folders: tuple[Path, Path], how: str,
                                                              reason: str) -> None:
    folder = tmp_path / "nowhere" if how == "not-a-folder" else _vae_folder(tmp_path, folders, how)
    backends = BackendSet.load(CPU, HunyuanConfig(model_path=str(folders[0]), vae_path=str(folder)))
    broken = status(backends)
    assert broken.state == "unavailable" and broken.variant == ""
    assert reason.format(folder=folder) in broken.reason and str(folder) in broken.reason
    assert status(backends, "inflate").state == "ready"


# ---------------------------------------------------------------------------------------------
# The lightning decoder


def test_lightning_decoding_reports_its_chunks_and_stops_between_them(lightning: BackendSet, picture) -> None:
    backend = lightning.get("hunyuan3d")
    # 128: FlashVDM decodes a first grid of 64^3 points, then a finer one near the surface.
    settings = ShapeSettings(resolution=128, steps=5, guidance_scale=5.0)
    details: list[str] = []
    with pytest.raises(Cancelled):
        backend.generate_batch(
            [ShapeItem(picture, 3, 1000)], settings, device=CPU, progress=lambda _f, detail: details.append(detail),
            should_stop=lambda: any(d.startswith("lightning decoding") for d in details),
        )
    assert details[-1] == "lightning decoding, object 1 of 1: chunk 1"  # stopped before the next chunk

    # FlashVDM's attention keeps state between chunks; a stopped decode leaves none behind.
    events: list[tuple[float, str]] = []
    (shape,) = backend.generate_batch([ShapeItem(picture, 3, 1000)], settings, device=CPU,
                                      progress=lambda fraction, detail: events.append((fraction, detail)))
    fresh = BackendSet.load(CPU, backend.config).get("hunyuan3d")
    (again,) = fresh.generate_batch([ShapeItem(picture, 3, 1000)], settings, device=CPU)
    assert isinstance(shape, Shape) and isinstance(again, Shape)
    assert np.array_equal(shape.vertices, again.vertices) and np.array_equal(shape.faces, again.faces)
    assert is_closed(shape.faces)
    decoding = [d for _, d in events if d.startswith("lightning decoding")]
    assert decoding[0] == "lightning decoding, object 1 of 1: chunk 1"
    chunks = int(decoding[-1].rsplit(": ", 1)[1].split()[0])
    assert decoding[-1].endswith(" chunks") and chunks > 4  # the first grid takes 4 chunks, the finer one more
    fractions = [f for f, _ in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_batch_of_turbo_objects_runs_in_one_call_with_five_steps(lightning: BackendSet, picture) -> None:
    backend = lightning.get("hunyuan3d")
    events: list[str] = []
    timings = BatchTimings()
    shapes = backend.generate_batch(
        [ShapeItem(picture, seed, 1000) for seed in (1, 2, 3)], ShapeSettings(64, 5, 5.0), device=CPU,
        progress=lambda _f, detail: events.append(detail), timings=timings,
    )
    # One denoising pass for the three: each step reported once.
    assert [d for d in events if d.startswith("denoising")] == [f"denoising step {k} of 5" for k in range(6)]
    finished = [d for d in events if d.startswith("lightning decoding") and d.endswith(" chunks")]
    assert [d.split(":")[0] for d in finished] == [f"lightning decoding, object {k} of 3" for k in (1, 2, 3)]
    assert all(isinstance(s, Shape) and is_closed(s.faces) for s in shapes)
    assert not np.array_equal(shapes[0].vertices[:10], shapes[1].vertices[:10])  # each its own seed
    assert set(timings.substages) == {"denoising", "volume_decoding", "surface_extraction"}


def _ball(n: int, radius: float, bound: float = 1.01) -> np.ndarray:
    axis = np.linspace(-bound, bound, n)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    return (radius - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32) * 10


def test_points_the_lightning_decoder_skipped_take_the_side_around_them() -> None:
    volume = _ball(65, 0.6)
    skipped = np.where(np.abs(volume) < 2.0, volume, np.nan).astype(np.float32)  # a band around the surface
    filled = fill_unevaluated(torch.from_numpy(skipped), 0.0).numpy()
    assert not np.isnan(filled).any()
    assert np.array_equal(filled > 0, volume > 0)
    vertices, faces = extract_surface(filled, bound=1.01)
    expected_vertices, expected_faces = extract_surface(volume, bound=1.01)
    assert np.array_equal(faces, expected_faces) and np.allclose(vertices, expected_vertices)

    # A hole in the band joins the skipped inside to the skipped outside: each point still takes the side
    # of the evaluated points nearest it, rather than the whole joined region one side.
    holed = skipped.copy()
    holed[40:, 28:37, 28:37] = np.nan
    filled = fill_unevaluated(torch.from_numpy(holed), 0.0).numpy()
    assert abs((filled > 0).mean() - (volume > 0).mean()) < 0.005
    assert is_closed(extract_surface(filled, bound=1.01)[1])

    assert torch.equal(fill_unevaluated(torch.from_numpy(volume), 0.0), torch.from_numpy(volume))
    with pytest.raises(EmptySurface):
        extract_surface(fill_unevaluated(torch.full((9, 9, 9), float("nan")), 0.0).numpy(), bound=1.01)


# ---------------------------------------------------------------------------------------------
# The recommendation


def test_decoding_that_dominates_shape_generation_recommends_flashvdm() -> None:
    from services.generation.telemetry_client import PipelineProfile, StageProfile, profile_to_proto
    from services.telemetry import validation
    from services.telemetry.aggregates import summarize
    from services.telemetry.recommendations import for_backend

    def profiles(backend: str, decoding: float) -> list:
        records = []
        for index in range(3):
            record = PipelineProfile(
                job_id=f"{backend}-{decoding}-{index}", backend=backend, worker_id="w", device="cuda:0",
                batch_size=1, image_width=512, image_height=512, resolution=256, steps=5,
                started_at=1_700_000_000.0, total_duration_s=10.0,
                stages=[StageProfile("image_loading", 0.0, 1.0, 0), StageProfile("shape_generation", 1.0, 9.0, 2**30)],
                succeeded=True, precision="fp16",
                substages={"shape_generation": {"denoising": 9.0 - decoding, "volume_decoding": decoding}},
            )
            records.append(validation.profile("p", profile_to_proto(record)))
        return records

    def codes(backend: str, decoding: float) -> dict[str, str]:
        records = profiles(backend, decoding)
        return {r.code: r.message for r in for_backend(backend, records, summarize(records))}

    dense = codes("hunyuan3d.turbo", 6.3)
    assert dense["enable_flashvdm"].startswith("volume decoding is 70% of shape_generation (6.30 s of 9.00 s")
    assert "HUNYUAN3D_FLASHVDM=1" in dense["enable_flashvdm"]
    assert "enable_flashvdm" not in codes("hunyuan3d.turbo.flashvdm", 6.3)  # already on
    assert "enable_flashvdm" not in codes("hunyuan3d", 2.7)  # 30%: denoising is the work
