"""Hunyuan3D-2 Turbo on a real stack, over gRPC and REST: a tiny random-weight turbo folder (consistency
scheduler), a separate tiny VAE folder through HUNYUAN3D_VAE_PATH, and FlashVDM's lightning decoder
(HUNYUAN3D_FLASHVDM=1).

One stack for every test: the backend list reports the variant and its 5 default steps, jobs without
`steps` run 5 steps with an event for each, the lightning decoder gives watertight GLBs, and jobs that
arrive together run as one batch whose costs telemetry learns under the variant's own name.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
import trimesh

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.stack import Stack
from tests.hunyuan_fixtures import hunyuan_stack, list_backends, tiny_turbo_model, tiny_turbo_vae
from tests.images import disk_png, photo_png
from tests.sse import read_events

# The name telemetry learns this stack's hunyuan3d costs under: the variant and the decoder.
TELEMETRY_NAME = "hunyuan3d.turbo.flashvdm"
SMALL = {"face_count": 1000, "texture_size": 256}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("turbo-service")
    model = tiny_turbo_model(tmp / "hunyuan3d-dit-v2-0-turbo")
    vae = tiny_turbo_vae(tmp / "hunyuan3d-vae-v2-0-turbo")
    # A batch window long enough for three submissions from threads.
    stack = hunyuan_stack(tmp, "turbo", model, HUNYUAN3D_FLASHVDM="1", HUNYUAN3D_VAE_PATH=str(vae),
                          GENERATION_MAX_QUEUE_DELAY_MS="600")
    try:
        yield stack
    finally:
        stack.stop("gateway")
        assert stack.stop("generation") == 0, (stack.log_dir / "generation.log").read_text()[-2000:]
        stack.stop_all()


@pytest.fixture(scope="module")
def generation(stack: Stack) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    with grpc.insecure_channel(stack.generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def http(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=60.0) as client:
        yield client


def reload_merged(data: bytes) -> trimesh.Trimesh:
    mesh = trimesh.load(trimesh.util.wrap_as_stream(data), file_type="glb", force="mesh")
    mesh.merge_vertices(merge_tex=True, merge_norm=True)  # seams split only by the texture are one vertex
    return mesh


def test_the_backend_list_reports_the_turbo_variant_and_its_steps(stack: Stack, http: httpx.Client) -> None:
    hunyuan = list_backends(stack)["hunyuan3d"]
    assert hunyuan.state == pb.BACKEND_STATE_READY and hunyuan.variant == "turbo"
    steps = next(p for p in hunyuan.parameters if p.name == "steps")
    assert (steps.default, steps.minimum, steps.maximum) == (5, 1, 100)
    assert list_backends(stack)["inflate"].variant == ""
    # Over REST the same defaults, so the Studio sets 5 steps when turbo is picked.
    listed = {b["name"]: b for b in http.get("/api/v1/backends").json()["backends"]}
    assert listed["hunyuan3d"]["ready"] and listed["hunyuan3d"]["parameters"]["steps"]["default"] == 5
    assert listed["hunyuan3d"]["variant"] == "turbo" and listed["inflate"]["variant"] is None


def test_grpc_runs_five_steps_and_the_lightning_decoder_to_a_watertight_glb(
    generation: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    # 128: the lightning decoder refines a finer grid near the surface (at 64 it decodes one grid).
    request = pb.GenerateRequest(backend="hunyuan3d", image=photo_png("astronaut", 256), resolution=128, seed=4,
                                 **SMALL)
    events = list(generation.Generate(request, timeout=120))
    terminal = events[-1]
    assert terminal.outcome.status == pb.JOB_STATUS_SUCCEEDED, terminal.outcome.error.message
    details = [e.detail for e in events
               if e.stage == pb.STAGE_SHAPE_GENERATION and e.state == pb.STAGE_STATE_PROGRESS]
    assert [d for d in details if d.startswith("denoising")] == [f"denoising step {k} of 5" for k in range(6)]
    lightning = [d for d in details if d.startswith("lightning decoding, object 1 of 1")]
    assert lightning[0].endswith(": chunk 1") and lightning[-1].endswith(" chunks")
    assert terminal.outcome.result.watertight

    job = generation.GetGeneration(pb.GetGenerationRequest(id=terminal.generation_id))
    assert job.parameters.steps == 5 and job.parameters.resolution == 128
    chunks = generation.DownloadResult(pb.DownloadResultRequest(id=job.id, format=pb.MESH_FORMAT_GLB), timeout=60)
    mesh = reload_merged(b"".join(c.data for c in chunks))
    assert len(mesh.faces) == terminal.outcome.result.faces <= SMALL["face_count"]
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0


def test_rest_gets_the_turbo_defaults_and_streams_five_steps(http: httpx.Client) -> None:
    response = http.post(
        "/api/v1/generations",
        files={"image": ("disk.png", disk_png(), "image/png")},
        data={"backend": "hunyuan3d", "resolution": "64", "face_count": "1000", "texture_size": "256"},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    events = read_events(http, f"/api/v1/generations/{job_id}/events")
    assert events[-1][0] == "succeeded", events[-1]
    details = [d.get("detail") for n, d in events if n == "stage" and d["state"] == "progress"]
    assert [d for d in details if d and d.startswith("denoising")] == [f"denoising step {k} of 5" for k in range(6)]
    assert any(d and d.startswith("lightning decoding") for d in details)
    assert http.get(f"/api/v1/generations/{job_id}").json()["parameters"]["steps"] == 5
    result = http.get(f"/api/v1/generations/{job_id}/result", params={"format": "glb"})
    assert result.status_code == 200 and reload_merged(result.content).is_watertight


def test_turbo_jobs_that_arrive_together_run_as_one_batch_learned_under_the_variant(
    stack: Stack, generation: generation_pb2_grpc.GenerationServiceStub,
) -> None:
    # A job just before, so the three below arrive during a burst (the batch window then waits for
    # company); another resolution, so it is not their batch-mate.
    blocker = generation.SubmitGeneration(pb.GenerateRequest(
        backend="hunyuan3d", image=disk_png(), resolution=96, **SMALL), timeout=30)
    request = pb.GenerateRequest(backend="hunyuan3d", image=photo_png("astronaut", 256), resolution=64, **SMALL)
    jobs: list[pb.Generation] = []
    threads = [threading.Thread(target=lambda: jobs.append(generation.SubmitGeneration(request, timeout=30)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in [blocker, *jobs]:
        events = list(generation.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))
        assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED, events[-1].outcome.error.message

    with grpc.insecure_channel(stack.telemetry_address) as channel:
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        deadline = time.monotonic() + 15
        while True:
            state = telemetry.GetOptimizerState(tpb.GetOptimizerStateRequest(backend=TELEMETRY_NAME,
                                                                             decisions_limit=50))
            batched = [d for d in state.decisions
                       if (d.resolution, d.steps) == (64, 5) and d.HasField("ran_size") and d.ran_size >= 2]
            cost = [c for c in state.costs if (c.backend, c.resolution, c.steps) == (TELEMETRY_NAME, 64, 5)]
            if (batched and cost) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        summary = telemetry.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend=TELEMETRY_NAME))
        standard = telemetry.GetOptimizerState(tpb.GetOptimizerStateRequest(backend="hunyuan3d"))
    assert batched, list(state.decisions)
    assert batched[0].ran_size == 3 and batched[0].peak_memory_bytes > 0
    assert cost and cost[0].observations >= 1 and cost[0].last_per_item_bytes > 0
    assert not [c for c in standard.costs if c.backend == "hunyuan3d"]  # the standard model's costs stay apart
    shape = next(s for s in summary.stage_breakdown if s.name == "shape_generation")
    assert {"denoising", "volume_decoding", "surface_extraction"} <= {p.name for p in shape.substages}
