"""backend=hunyuan3d on real stacks, over gRPC and REST (and the CLI), with tiny random-weight checkpoints.

Two stacks: one whose weights load (the five stages, batching, cancelling,
seeds, bad guidance, the CLI and the Studio), and one whose generation
service starts with broken weights (a clear refusal while inflate keeps
serving), is restarted with a model that decodes an empty volume (a clean
failure), then with working weights and a memory limit that one object fits
and two do not (the out-of-memory split).
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch
import trimesh

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.generation.backends.hunyuan3d import WEIGHTS_FILE
from services.stack import Stack
from tests.hunyuan_fixtures import FAST, hunyuan_stack, tiny_model, wait_for_backends
from tests.images import disk_png, photo_png
from tests.logs import entries
from tests.sse import read_events

STAGES = [
    pb.STAGE_IMAGE_LOADING,
    pb.STAGE_IMAGE_PREPROCESSING,
    pb.STAGE_SHAPE_GENERATION,
    pb.STAGE_TEXTURE_SYNTHESIS,
    pb.STAGE_MESH_EXPORT,
]
ORFEAS = str(Path(sys.executable).parent / "orfeas")


class Client:
    """gRPC and REST to one stack."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.channel = grpc.insecure_channel(stack.generation_address)
        self.grpc = generation_pb2_grpc.GenerationServiceStub(self.channel)
        self.http = httpx.Client(base_url=stack.gateway_url, timeout=60.0)

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def generate(self, **fields) -> list[pb.GenerationEvent]:
        request = pb.GenerateRequest(backend="hunyuan3d", **{"image": photo_png("astronaut", 256), **FAST, **fields})
        # wait_for_ready: the generation service may just have been restarted (test_an_empty_surface...).
        return list(self.grpc.Generate(request, timeout=120, wait_for_ready=True))

    def download(self, job_id: str, fmt: int = pb.MESH_FORMAT_GLB) -> bytes:
        chunks = self.grpc.DownloadResult(pb.DownloadResultRequest(id=job_id, format=fmt), timeout=60)
        return b"".join(c.data for c in chunks)


def _client(stack: Stack) -> Iterator[Client]:
    client = Client(stack)
    try:
        yield client
    finally:
        client.close()
        stack.stop("gateway")
        # A clean exit after hy3dgen was loaded on a thread (a first import of pymeshlab off the main
        # thread once made every exit abort).
        assert stack.stop("generation") == 0, (stack.log_dir / "generation.log").read_text()[-2000:]
        stack.stop_all()


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    tmp = tmp_path_factory.mktemp("hunyuan-ready")
    model = tiny_model(tmp / "model")
    # A batch window long enough for three submissions from threads (test_jobs_that_arrive_together...).
    stack = hunyuan_stack(tmp, "hunyuan-ready", model, GENERATION_MAX_QUEUE_DELAY_MS="600")
    yield from _client(stack)


@pytest.fixture(scope="module")
def unhappy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """Starts with broken weights; the tests after restart its generation service with other models."""
    tmp = tmp_path_factory.mktemp("hunyuan-unhappy")
    broken = tiny_model(tmp / "broken")
    weights = broken / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size * 2 // 3])  # cut short
    tiny_model(tmp / "empty", zero_geometry_output=True)
    tiny_model(tmp / "working")
    stack = hunyuan_stack(tmp, "hunyuan-unhappy", broken, with_telemetry=False)
    yield from _client(stack)


def restart_generation(stack: Stack, **env: str) -> dict[str, pb.Backend]:
    assert stack.stop("generation") == 0
    stack.extra_env.update(env)
    stack.start("generation")
    return wait_for_backends(stack)


def stage_events(events: list[pb.GenerationEvent], state: int) -> list[pb.GenerationEvent]:
    return [e for e in events if e.kind == pb.EVENT_KIND_STAGE and e.state == state]


def reload_merged(data: bytes) -> trimesh.Trimesh:
    mesh = trimesh.load(trimesh.util.wrap_as_stream(data), file_type="glb", force="mesh")
    # Vertices split only along texture seams are one vertex of the closed surface.
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    return mesh


# ---------------------------------------------------------------------------------------------
# Weights that load


def test_grpc_runs_all_five_stages_with_per_step_progress_to_a_watertight_glb(ready: Client) -> None:
    events = ready.generate(seed=11)
    terminal = events[-1]
    assert terminal.outcome.status == pb.JOB_STATUS_SUCCEEDED, terminal.outcome.error.message
    assert [e.stage for e in stage_events(events, pb.STAGE_STATE_COMPLETED)] == STAGES
    details = [e.detail for e in stage_events(events, pb.STAGE_STATE_PROGRESS) if e.stage == pb.STAGE_SHAPE_GENERATION]
    steps = FAST["steps"]
    assert [d for d in details if d.startswith("denoising")] == [f"denoising step {k} of {steps}"
                                                                 for k in range(steps + 1)]
    assert any(d.startswith("decoding chunk") for d in details)
    assert terminal.outcome.result.watertight and terminal.outcome.result.faces <= FAST["face_count"]

    job = ready.grpc.GetGeneration(pb.GetGenerationRequest(id=terminal.generation_id))
    assert job.parameters.backend == "hunyuan3d" and job.parameters.guidance_scale == pytest.approx(5.0)
    mesh = reload_merged(ready.download(job.id))
    assert len(mesh.faces) == terminal.outcome.result.faces
    assert mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0

    # The job's log line shows the denoising apart from the volume decoding.
    log = ready.stack.log_dir / "generation.log"
    deadline = time.monotonic() + 10
    while True:
        finished = [e for e in entries(log) if e.get("msg") == "job finished" and e.get("job_id") == job.id]
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    parts = finished[0]["substages"]["shape_generation"]
    assert parts["denoising"] > 0 and parts["volume_decoding"] > 0 and "surface_extraction" in parts


def test_rest_uses_the_backends_own_defaults_and_streams_the_steps(ready: Client) -> None:
    response = ready.http.post(
        "/api/v1/generations",
        files={"image": ("disk.png", disk_png(), "image/png")},
        data={"backend": "hunyuan3d", "resolution": "64", "face_count": "1000", "texture_size": "256"},
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    events = read_events(ready.http, f"/api/v1/generations/{job_id}/events")
    assert events[-1][0] == "succeeded", events[-1]
    details = [d.get("detail") for n, d in events if n == "stage" and d["state"] == "progress"]
    assert "denoising step 30 of 30" in details  # steps default to 30 for hunyuan3d
    job = ready.http.get(f"/api/v1/generations/{job_id}").json()
    assert job["parameters"]["steps"] == 30 and job["parameters"]["guidance_scale"] == 5.0
    result = ready.http.get(f"/api/v1/generations/{job_id}/result", params={"format": "glb"})
    assert result.status_code == 200
    assert reload_merged(result.content).is_watertight


def test_jobs_that_arrive_together_run_as_one_batch_the_optimizer_records(ready: Client) -> None:
    # A job just before, so that the three below arrive during a burst (the batch window then waits for
    # company); other steps, so it is not their batch-mate.
    blocker = ready.grpc.SubmitGeneration(pb.GenerateRequest(
        backend="hunyuan3d", image=disk_png(), **{**FAST, "steps": 5}), timeout=30)
    request = pb.GenerateRequest(backend="hunyuan3d", image=photo_png("astronaut", 256), **{**FAST, "steps": 3})
    jobs: list[pb.Generation] = []
    threads = [threading.Thread(target=lambda: jobs.append(ready.grpc.SubmitGeneration(request, timeout=30)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in [blocker, *jobs]:
        events = list(ready.grpc.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))
        assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED, events[-1].outcome.error.message

    with grpc.insecure_channel(ready.stack.telemetry_address) as channel:
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        deadline = time.monotonic() + 15
        while True:
            request = tpb.GetOptimizerStateRequest(backend="hunyuan3d", decisions_limit=50)
            state = telemetry.GetOptimizerState(request)
            batched = [d for d in state.decisions if d.steps == 3 and d.HasField("ran_size") and d.ran_size >= 2]
            cost = [c for c in state.costs if (c.backend, c.resolution, c.steps) == ("hunyuan3d", 64, 3)]
            if (batched and cost) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # The profile carries the parts of shape_generation.
        summary = telemetry.GetPerformanceSummary(tpb.GetPerformanceSummaryRequest(backend="hunyuan3d"))
    assert batched, list(state.decisions)
    assert batched[0].ran_size == 3 and batched[0].peak_memory_bytes > 0
    assert cost and cost[0].observations >= 1 and cost[0].last_per_item_bytes > 0
    shape = next(s for s in summary.stage_breakdown if s.name == "shape_generation")
    assert {"denoising", "volume_decoding", "surface_extraction"} <= {p.name for p in shape.substages}


def test_cancelling_in_the_middle_of_denoising(ready: Client) -> None:
    request = pb.GenerateRequest(backend="hunyuan3d", image=disk_png(), **{**FAST, "steps": 100})
    events = []
    for event in ready.grpc.Generate(request, timeout=120):
        events.append(event)
        if event.detail == "denoising step 2 of 100":
            ready.grpc.CancelGeneration(pb.CancelGenerationRequest(id=event.generation_id))
    assert events[-1].outcome.status == pb.JOB_STATUS_CANCELLED
    details = [e.detail for e in events if e.detail]
    last_step = max(int(d.split()[2]) for d in details if d.startswith("denoising step"))
    assert 2 <= last_step < 100  # it stopped between two steps
    assert not any(d.startswith("decoding") for d in details)


def test_the_same_seed_gives_the_same_mesh(ready: Client) -> None:
    def mesh_of(seed: int) -> bytes:
        terminal = ready.generate(seed=seed, image=disk_png())[-1]
        assert terminal.outcome.status == pb.JOB_STATUS_SUCCEEDED, terminal.outcome.error.message
        return ready.download(terminal.generation_id, pb.MESH_FORMAT_STL)

    # (That another seed gives another mesh is checked in-process: test_an_items_noise_depends_on_its_own_seed_only.)
    assert mesh_of(42) == mesh_of(42)


def test_a_bad_guidance_scale_is_invalid_argument_naming_the_field(ready: Client) -> None:
    for value in (25.0, -1.0, float("nan")):
        with pytest.raises(grpc.RpcError) as refusal:
            ready.grpc.SubmitGeneration(pb.GenerateRequest(backend="hunyuan3d", image=disk_png(), guidance_scale=value))
        assert refusal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert refusal.value.details().startswith("guidance_scale: must be between 0 and 20"), refusal.value.details()
    for value in ("25", "-0.5", "lots", "nan"):
        response = ready.http.post("/api/v1/generations", files={"image": ("d.png", disk_png(), "image/png")},
                                   data={"backend": "hunyuan3d", "guidance_scale": value})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "INVALID_ARGUMENT"
        assert response.json()["error"]["message"].startswith("guidance_scale:")
    # The backend's own ranges: an octree of 1024 is inflate's range, not hunyuan3d's.
    with pytest.raises(grpc.RpcError) as refusal:
        ready.grpc.SubmitGeneration(pb.GenerateRequest(backend="hunyuan3d", image=disk_png(), resolution=1024))
    assert refusal.value.details().startswith("resolution: must be between 64 and 512 for the hunyuan3d backend")


def test_the_backend_list_says_both_are_ready(ready: Client) -> None:
    body = ready.http.get("/api/v1/backends").json()
    listed = {b["name"]: b for b in body["backends"]}
    assert body["default"] == "inflate"
    assert listed["hunyuan3d"]["ready"] and listed["hunyuan3d"]["reason"] is None
    assert listed["hunyuan3d"]["parameters"]["steps"] == {"minimum": 1, "maximum": 100, "default": 30,
                                                          "meaning": "denoising steps"}
    assert listed["hunyuan3d"]["parameters"]["guidance_scale"]["default"] == 5
    assert "guidance_scale" not in listed["inflate"]["parameters"]
    assert listed["inflate"]["parameters"]["resolution"]["maximum"] == 1024
    assert ready.http.get("/readyz").json()["backends"] == {"inflate": "ready", "hunyuan3d": "ready"}


def test_the_cli_takes_the_backend_and_shows_the_steps(ready: Client, tmp_path: Path) -> None:
    image = tmp_path / "disk.png"
    image.write_bytes(disk_png())
    out = tmp_path / "model.glb"
    result = subprocess.run(
        [ORFEAS, "--url", ready.stack.gateway_url, "generate", str(image), "-o", str(out), "--backend", "hunyuan3d",
         "--resolution", "64", "--steps", "4", "--guidance-scale", "7.5", "--face-count", "1000",
         "--texture-size", "256"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "shape_generation: denoising step 4 of 4" in result.stderr
    assert "watertight=True" in result.stderr
    assert reload_merged(out.read_bytes()).is_watertight


def test_the_studio_offers_the_backend_and_shows_the_steps(ready: Client) -> None:
    from playwright.sync_api import expect, sync_playwright

    from tests.studio_helpers import DESKTOP, Traffic, launch, new_page

    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            _, page = new_page(browser, Traffic(), DESKTOP)
            page.goto(ready.stack.gateway_url + "/")
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            backend = page.get_by_label("Backend", exact=True)
            expect(backend.locator("option")).to_have_count(2)  # filled from /api/v1/backends
            expect(page.get_by_label("Guidance scale", exact=True)).to_be_disabled()  # inflate has none
            backend.select_option("hunyuan3d")
            # The backend's own defaults, ranges and meaning.
            expect(page.get_by_label("Steps", exact=True)).to_have_value("30")
            expect(page.locator("#steps-hint")).to_have_text("Denoising steps, 1–100")
            expect(page.get_by_label("Guidance scale", exact=True)).to_be_enabled()
            for label, value in {"Resolution": "64", "Steps": "4", "Guidance scale": "6.5", "Face count": "1000",
                                 "Texture size": "256"}.items():
                page.get_by_label(label, exact=True).fill(value)
            page.locator("#image").set_input_files(
                {"name": "disk.png", "mimeType": "image/png", "buffer": disk_png()}
            )
            # Every status line the page shows, kept as it changes.
            page.evaluate("""() => {
                window.statusLines = [];
                const status = document.querySelector('#run-status');
                new MutationObserver(() => window.statusLines.push(status.textContent))
                    .observe(status, {childList: true, characterData: true, subtree: true});
            }""")
            page.get_by_role("button", name="Generate").click()
            expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded", timeout=60_000)
            lines = page.evaluate("window.statusLines")
            assert any("denoising step" in line for line in lines), lines
            job = ready.http.get(f"/api/v1/generations/{page.locator('#job-id').inner_text().strip()}").json()
            assert job["parameters"]["backend"] == "hunyuan3d" and job["parameters"]["guidance_scale"] == 6.5
        finally:
            browser.close()


# ---------------------------------------------------------------------------------------------
# Broken weights, empty surfaces


def test_broken_weights_are_refused_with_the_reason_while_inflate_serves(unhappy: Client) -> None:
    broken = unhappy
    backends = wait_for_backends(broken.stack)
    hunyuan = backends["hunyuan3d"]
    weights = str(Path(broken.stack.data_dir).parent / "broken" / WEIGHTS_FILE)
    assert hunyuan.state == pb.BACKEND_STATE_UNAVAILABLE
    assert hunyuan.reason.startswith(f"weights at {weights} could not be loaded"), hunyuan.reason

    with pytest.raises(grpc.RpcError) as refusal:
        broken.grpc.SubmitGeneration(pb.GenerateRequest(backend="hunyuan3d", image=disk_png()))
    assert refusal.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refusal.value.details().startswith(f"backend: hunyuan3d is not available: weights at {weights}")

    response = broken.http.post("/api/v1/generations", files={"image": ("d.png", disk_png(), "image/png")},
                                data={"backend": "hunyuan3d"})
    assert response.status_code == 412, response.text
    assert response.json()["error"]["code"] == "FAILED_PRECONDITION"
    assert weights in response.json()["error"]["message"]

    listed = {b["name"]: b for b in broken.http.get("/api/v1/backends").json()["backends"]}
    assert not listed["hunyuan3d"]["ready"] and listed["hunyuan3d"]["state"] == "unavailable"
    assert weights in listed["hunyuan3d"]["reason"]
    readiness = broken.http.get("/readyz").json()
    assert readiness["backends"]["inflate"] == "ready"
    assert readiness["backends"]["hunyuan3d"].startswith("unavailable: weights at")

    inflate = list(broken.grpc.Generate(pb.GenerateRequest(image=disk_png(), resolution=64, face_count=1000,
                                                           texture_size=256), timeout=60))
    assert inflate[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED, inflate[-1].outcome.error.message


def test_an_empty_surface_is_a_clean_failure(unhappy: Client) -> None:
    empty = unhappy
    stack = empty.stack
    backends = restart_generation(stack, HUNYUAN3D_MODEL_PATH=str(Path(stack.data_dir).parent / "empty"))
    assert backends["hunyuan3d"].state == pb.BACKEND_STATE_READY
    events = empty.generate()
    outcome = events[-1].outcome
    assert outcome.status == pb.JOB_STATUS_FAILED
    assert outcome.error.code == "INVALID_ARGUMENT"
    assert outcome.error.message.startswith("image: the model found no surface for this picture")
    failed = stage_events(events, pb.STAGE_STATE_FAILED)
    assert [e.stage for e in failed] == [pb.STAGE_SHAPE_GENERATION]
    # The service is fine: inflate still serves.
    inflate = list(empty.grpc.Generate(pb.GenerateRequest(image=disk_png(), resolution=64, face_count=1000,
                                                          texture_size=256), timeout=60, wait_for_ready=True))
    assert inflate[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED


def test_a_batch_that_runs_out_of_memory_is_split_and_every_job_succeeds(unhappy: Client) -> None:
    from services.common.config import HunyuanConfig
    from services.generation.backends.registry import BackendSet

    stack = unhappy.stack
    working = Path(stack.data_dir).parent / "working"
    # The service's own memory model of one object at these settings: room for one, not for two.
    item = BackendSet.load(torch.device("cpu"), HunyuanConfig(model_path=str(working))).get(
        "hunyuan3d").estimate_item_bytes(FAST["resolution"], 3)
    restart_generation(stack, HUNYUAN3D_MODEL_PATH=str(working),
                       GENERATION_MEMORY_LIMIT_MB=str(int(1.5 * item / 2**20)),
                       GENERATION_MAX_QUEUE_DELAY_MS="600")
    # As in test_jobs_that_arrive_together...: a job just before makes the two below a burst, batched.
    blocker = unhappy.grpc.SubmitGeneration(pb.GenerateRequest(
        backend="hunyuan3d", image=disk_png(), **{**FAST, "steps": 5}), timeout=30, wait_for_ready=True)
    request = pb.GenerateRequest(backend="hunyuan3d", image=photo_png("astronaut", 256), **{**FAST, "steps": 3})
    jobs: list[pb.Generation] = []
    threads = [threading.Thread(target=lambda: jobs.append(unhappy.grpc.SubmitGeneration(request, timeout=30)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in [blocker, *jobs]:
        events = list(unhappy.grpc.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))
        assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED, events[-1].outcome.error.message

    log = entries(stack.log_dir / "generation.log")
    splits = [e for e in log if e.get("msg") == "out of memory; splitting the batch"]
    assert splits and splits[-1]["batch_size"] == 2 and splits[-1]["into"] == [1, 1]
    finished = {e["job_id"]: e for e in log if e.get("msg") == "job finished"}
    assert all(finished[job.id]["batch_size"] == 1 for job in jobs)

