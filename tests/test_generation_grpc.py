"""GenerationService over gRPC, against the real service."""
from __future__ import annotations

import hashlib
import time

import grpc
import pytest
import trimesh

from pb.orfeas.generation.v1 import generation_pb2 as pb
from tests.images import disk_png, photo_jpeg, photo_png

FAST = dict(resolution=96, face_count=4000, texture_size=256)
STAGES = [
    pb.STAGE_IMAGE_LOADING,
    pb.STAGE_IMAGE_PREPROCESSING,
    pb.STAGE_SHAPE_GENERATION,
    pb.STAGE_TEXTURE_SYNTHESIS,
    pb.STAGE_MESH_EXPORT,
]


def generate(stub, **fields) -> list[pb.GenerationEvent]:
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=120))


def download(stub, job_id: str, fmt: int = 0) -> tuple[bytes, list[pb.ResultChunk]]:
    chunks = list(stub.DownloadResult(pb.DownloadResultRequest(id=job_id, format=fmt), timeout=60))
    return b"".join(c.data for c in chunks), chunks


def test_generate_streams_every_stage_then_the_outcome(generation_stub):
    events = generate(generation_stub, image=photo_png("astronaut"), seed=7, **FAST)
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    terminal = events[-1]
    assert terminal.kind == pb.EVENT_KIND_TERMINAL
    assert terminal.outcome.status == pb.JOB_STATUS_SUCCEEDED, terminal.outcome.error.message
    completed = [e.stage for e in events if e.kind == pb.EVENT_KIND_STAGE and e.state == pb.STAGE_STATE_COMPLETED]
    assert completed == STAGES
    for e in events:
        if e.kind == pb.EVENT_KIND_STAGE and e.state == pb.STAGE_STATE_COMPLETED:
            assert e.elapsed_seconds > 0
    progress = [e.progress for e in events]
    assert progress == sorted(progress) and progress[-1] == pytest.approx(1.0)
    stats = terminal.outcome.result
    assert stats.watertight and stats.vertices > 100 and stats.faces > 100
    # The job writes the format it asked for (GLB by default); the others are written on their first download.
    assert {s.format for s in stats.sizes} == {pb.MESH_FORMAT_GLB}
    job_id = terminal.generation_id
    for fmt in (pb.MESH_FORMAT_OBJ, pb.MESH_FORMAT_STL, pb.MESH_FORMAT_PLY):
        data, chunks = download(generation_stub, job_id, fmt)
        assert chunks[0].sha256 == hashlib.sha256(data).hexdigest()
        # Written once, then kept: the same bytes again, and the job now lists it.
        assert download(generation_stub, job_id, fmt)[0] == data
    after = generation_stub.GetGeneration(pb.GetGenerationRequest(id=job_id)).result
    assert {s.format for s in after.sizes} == {pb.MESH_FORMAT_GLB, pb.MESH_FORMAT_OBJ, pb.MESH_FORMAT_STL,
                                               pb.MESH_FORMAT_PLY}


def test_submit_get_watch_download(generation_stub):
    job = generation_stub.SubmitGeneration(pb.GenerateRequest(image=photo_jpeg("chelsea"), seed=3, **FAST))
    assert job.status in (pb.JOB_STATUS_QUEUED, pb.JOB_STATUS_RUNNING)
    assert job.parameters.seed == 3 and job.parameters.resolution == 96
    assert job.parameters.format == pb.MESH_FORMAT_GLB  # the default
    events = list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))
    assert events[-1].kind == pb.EVENT_KIND_TERMINAL
    # A late watcher gets the same events again, then the end.
    again = list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=30))
    assert [(e.sequence, e.kind, e.stage, e.state) for e in again] == [
        (e.sequence, e.kind, e.stage, e.state) for e in events
    ]
    done = generation_stub.GetGeneration(pb.GetGenerationRequest(id=job.id))
    assert done.status == pb.JOB_STATUS_SUCCEEDED
    assert done.progress == pytest.approx(1.0)
    assert [t.stage for t in done.stage_timings] == STAGES
    data, chunks = download(generation_stub, job.id)
    assert chunks[0].content_type == "model/gltf-binary" and chunks[0].filename.endswith(".glb")
    assert chunks[0].total_bytes == len(data)
    assert chunks[0].sha256 == hashlib.sha256(data).hexdigest()
    mesh = trimesh.load(trimesh.util.wrap_as_stream(data), file_type="glb", force="mesh")
    assert len(mesh.faces) > 100


def test_unset_seed_is_resolved_and_reported(generation_stub):
    job = generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **FAST))
    assert job.parameters.seed > 0
    list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))


def test_download_streams_in_chunks_of_at_most_one_mebibyte(generation_stub):
    # An untextured high-resolution OBJ is several MiB: more than one chunk,
    # and more than the 4 MiB message limit, must still arrive whole.
    events = generate(
        generation_stub, image=disk_png(512), resolution=512, face_count=500_000, texture=False, steps=30
    )
    assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED, events[-1].outcome.error.message
    data, chunks = download(generation_stub, events[-1].generation_id, pb.MESH_FORMAT_PLY)
    assert all(len(c.data) <= 1024 * 1024 for c in chunks)
    assert len(chunks) >= 2 and len(data) == chunks[0].total_bytes


@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        (dict(resolution=5000), "resolution"),
        (dict(resolution=10), "resolution"),
        (dict(steps=0), "steps"),
        (dict(face_count=10), "face_count"),
        (dict(texture_size=100), "texture_size"),
        (dict(foreground_ratio=1.5), "foreground_ratio"),
        (dict(backend="hunyuan-xl"), "backend"),
        (dict(request_id="../../etc/passwd"), "request_id"),
        (dict(timeout_seconds=-1), "timeout_seconds"),
        (dict(format=99), "format"),
    ],
)
def test_out_of_range_is_invalid_argument_naming_the_field(generation_stub, fields, field_name):
    with pytest.raises(grpc.RpcError) as err:
        generation_stub.SubmitGeneration(pb.GenerateRequest(image=photo_png(), **fields))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field_name}:")


@pytest.mark.parametrize(
    "image",
    [b"", b"definitely not a picture", photo_png()[:200]],
    ids=["empty", "not-an-image", "truncated-png"],
)
def test_bad_pictures_are_refused_and_the_service_keeps_serving(generation_stub, image):
    with pytest.raises(grpc.RpcError) as err:
        list(generation_stub.Generate(pb.GenerateRequest(image=image), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("image:")
    events = generate(generation_stub, image=disk_png(), **FAST)
    assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED


def test_unknown_and_malformed_ids(generation_stub):
    with pytest.raises(grpc.RpcError) as err:
        generation_stub.GetGeneration(pb.GetGenerationRequest(id="0" * 32))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for bad in ("../etc/passwd", "x" * 500, "", "ÜNICODE"):
        with pytest.raises(grpc.RpcError) as err:
            generation_stub.GetGeneration(pb.GetGenerationRequest(id=bad))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("id:")


def test_list_is_newest_first_and_paginated(generation_stub):
    ids = [
        generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **FAST)).id for _ in range(3)
    ]
    first = generation_stub.ListGenerations(pb.ListGenerationsRequest(page_size=2))
    assert [g.id for g in first.generations] == ids[::-1][:2]
    assert first.next_page_token
    second = generation_stub.ListGenerations(pb.ListGenerationsRequest(page_size=2, page_token=first.next_page_token))
    assert second.generations[0].id == ids[0]
    for job_id in ids:
        list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=job_id), timeout=120))
    with pytest.raises(grpc.RpcError) as err:
        generation_stub.ListGenerations(pb.ListGenerationsRequest(page_token="garbage"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_queued_and_running_jobs(generation_stub):
    # Three slow jobs of different resolutions (so they cannot share a batch)
    # keep the device, the prepared slot and the preparing loop busy; the
    # fourth job is certainly still queued when it is cancelled.
    slow = [
        generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), resolution=r, steps=500))
        for r in (1024, 1000, 999)
    ]
    queued = generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **FAST))
    cancelled = generation_stub.CancelGeneration(pb.CancelGenerationRequest(id=queued.id))
    assert cancelled.status == pb.JOB_STATUS_CANCELLED
    assert "queued" in cancelled.error.message
    events = list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=queued.id), timeout=30))
    assert events[-1].outcome.status == pb.JOB_STATUS_CANCELLED
    assert not [e for e in events if e.stage == pb.STAGE_SHAPE_GENERATION]
    for job in slow:
        generation_stub.CancelGeneration(pb.CancelGenerationRequest(id=job.id))
    for job in slow:
        end = list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120))[-1]
        assert end.outcome.status == pb.JOB_STATUS_CANCELLED
    with pytest.raises(grpc.RpcError) as err:
        download(generation_stub, queued.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_request_id_makes_submission_idempotent(generation_stub):
    key = f"test-idem-{time.time_ns()}"
    first = generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), request_id=key, **FAST))
    again = generation_stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), request_id=key, **FAST))
    assert again.id == first.id
    with pytest.raises(grpc.RpcError) as err:
        generation_stub.SubmitGeneration(pb.GenerateRequest(image=photo_png(), request_id=key, **FAST))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    list(generation_stub.WatchGeneration(pb.WatchGenerationRequest(id=first.id), timeout=120))


def test_health_and_reflection_are_served(stack):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(stack.generation_address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="orfeas.generation.v1.GenerationService")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
