"""The batch processor seen from outside: batching, out-of-memory recovery,
the bounded queue, deadlines and disconnects, on a stack of its own whose
knobs make each path easy to reach."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.generation.backends.registry import get_backend
from tests.conftest import new_stack
from tests.images import disk_png, photo_png
from tests.logs import entries

RES = 128
SMALL = dict(resolution=RES, steps=20, face_count=2000, texture_size=256)
QUEUE_LIMIT = 6


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    item = get_backend("inflate").estimate_item_bytes(RES, SMALL["steps"])
    # Room for two items at RES but not four: a batch of four must split.
    limit_mb = max(1, int(2.5 * item / 2**20))
    stack = new_stack(
        tmp_path_factory.mktemp("limited"),
        "limited",
        GENERATION_MEMORY_LIMIT_MB=str(limit_mb),
        GENERATION_MAX_BATCH_SIZE="4",
        GENERATION_MAX_QUEUE_DELAY_MS="300",
    )
    stack.start_all()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory):
    stack = new_stack(tmp_path_factory.mktemp("small-queue"), "small-queue", GENERATION_QUEUE_LIMIT=str(QUEUE_LIMIT))
    stack.start_all()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def stub(limited):
    with grpc.insecure_channel(limited.generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


@pytest.fixture(scope="module")
def queue_stub(small_queue):
    with grpc.insecure_channel(small_queue.generation_address) as channel:
        yield generation_pb2_grpc.GenerationServiceStub(channel)


def watch(stub, job_id: str) -> list[pb.GenerationEvent]:
    return list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job_id), timeout=180))


def occupy(stub, n: int = 3) -> list[str]:
    """Slow jobs of different resolutions: they cannot share a batch, so they keep the worker busy."""
    return [
        stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(256), resolution=r, steps=500, texture=False)).id
        for r in (1000, 999, 998)[:n]
    ]


def cancel_all(stub, ids: list[str]) -> None:
    for job_id in ids:
        stub.CancelGeneration(pb.CancelGenerationRequest(id=job_id))
    for job_id in ids:
        watch(stub, job_id)


def test_compatible_jobs_are_batched_and_out_of_memory_splits_the_batch(limited, stub):
    # Submitted together, as concurrent clients would: a burst the batch window gathers.
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda i: stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), seed=i, **SMALL)).id, range(4)))
    outcomes = [watch(stub, job_id)[-1].outcome for job_id in ids]
    assert all(o.status == pb.JOB_STATUS_SUCCEEDED for o in outcomes), [o.error.message for o in outcomes]
    log = limited.log_dir / "generation.log"
    assert entries(log, "out of memory; splitting the batch"), "a batch of 4 should not fit the injected limit"
    sizes = [e["batch_size"] for e in entries(log, "job finished") if e["job_id"] in ids]
    assert max(sizes) == 2  # split from 4 down to what fits
    # The same inputs give the same mesh whatever batch they ran in.
    again = list(stub.Generate(pb.GenerateRequest(image=disk_png(), seed=0, **SMALL), timeout=120))[-1]
    assert again.outcome.result.vertices == outcomes[0].result.vertices
    assert again.outcome.result.volume == pytest.approx(outcomes[0].result.volume, rel=1e-9)


def test_a_job_that_cannot_fit_alone_fails_with_resource_exhausted(stub):
    end = list(stub.Generate(pb.GenerateRequest(image=disk_png(), resolution=1024, steps=5), timeout=120))[-1]
    assert end.outcome.status == pb.JOB_STATUS_FAILED
    assert end.outcome.error.code == "RESOURCE_EXHAUSTED"
    assert "even alone" in end.outcome.error.message
    # The worker is not wedged.
    ok = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=120))[-1]
    assert ok.outcome.status == pb.JOB_STATUS_SUCCEEDED


def test_full_queue_is_resource_exhausted_and_429_with_retry_after(small_queue, queue_stub):
    stub = queue_stub
    busy = occupy(stub)
    accepted: list[str] = []
    with pytest.raises(grpc.RpcError) as err:
        for _ in range(QUEUE_LIMIT + 4):
            accepted.append(stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **SMALL)).id)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(err.value.trailing_metadata())["retry-after"].isdigit()
    status = stub.GetGeneration(pb.GetGenerationRequest(id=accepted[-1]))
    assert status.queue_position >= 1
    # The worker may have taken a batch meanwhile; post until the queue is full again.
    for _ in range(QUEUE_LIMIT + 4):
        response = httpx.post(
            f"{small_queue.gateway_url}/api/v1/generations",
            files={"image": ("d.png", disk_png(), "image/png")},
            data={k: str(v) for k, v in SMALL.items()},
        )
        if response.status_code != 202:
            break
        accepted.append(response.json()["id"])
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    cancel_all(stub, busy + accepted)


def test_a_deadline_that_passes_in_the_queue_means_never_started(queue_stub):
    stub = queue_stub
    busy = occupy(stub)
    late = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), timeout_seconds=0.5, **SMALL))
    events = watch(stub, late.id)
    assert events[-1].outcome.error.code == "DEADLINE_EXCEEDED"
    assert not [e for e in events if e.stage == pb.STAGE_SHAPE_GENERATION]
    # A gRPC deadline on Generate propagates the same way: the job itself ends DEADLINE_EXCEEDED.
    call = stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=1.0)
    job_id = next(call).generation_id
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    ended = watch(stub, job_id)
    assert ended[-1].outcome.error.code == "DEADLINE_EXCEEDED"
    assert not [e for e in ended if e.stage == pb.STAGE_SHAPE_GENERATION]
    cancel_all(stub, busy)


def test_disconnecting_from_generate_does_not_cancel_unless_asked(queue_stub):
    stub = queue_stub
    busy = occupy(stub)  # both jobs are still queued when their clients go away
    kept_id = _generate_then_disconnect(stub, cancel_on_disconnect=False)
    dropped_id = _generate_then_disconnect(stub, cancel_on_disconnect=True)
    cancel_all(stub, busy)
    assert watch(stub, kept_id)[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED
    assert watch(stub, dropped_id)[-1].outcome.status == pb.JOB_STATUS_CANCELLED


def _generate_then_disconnect(stub, cancel_on_disconnect: bool) -> str:
    call = stub.Generate(
        pb.GenerateRequest(image=photo_png(), resolution=512, steps=200, face_count=2000, texture_size=256,
                           cancel_on_disconnect=cancel_on_disconnect),
        timeout=120,
    )
    first = next(call)
    call.cancel()
    time.sleep(0.3)  # let the server see the disconnect
    return first.generation_id




def test_cancelling_one_job_leaves_its_batch_mate_unaffected(small_queue, queue_stub):
    stub = queue_stub
    # Three slow jobs fill the device, the prepared slot and the preparing loop,
    # so the next two wait in the queue together and are taken as one batch.
    pacers = occupy(stub)
    params = dict(resolution=320, steps=500, face_count=2000, texture_size=256)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda s: stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), seed=s, **params)).id, (1, 2))
    for pacer in pacers:
        stub.CancelGeneration(pb.CancelGenerationRequest(id=pacer))
    for event in stub.WatchGeneration(pb.WatchGenerationRequest(id=a), timeout=120):
        if event.stage == pb.STAGE_SHAPE_GENERATION and event.state == pb.STAGE_STATE_STARTED:
            stub.CancelGeneration(pb.CancelGenerationRequest(id=a))
            break
    assert watch(stub, a)[-1].outcome.status == pb.JOB_STATUS_CANCELLED
    assert watch(stub, b)[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED
    finished = {e["job_id"]: e for e in entries(small_queue.log_dir / "generation.log", "job finished")}
    assert finished[b]["batch_size"] == 2  # they did share the batch


def test_queued_events_follow_the_queue_forward(queue_stub):
    stub = queue_stub
    busy = occupy(stub)
    # Different resolutions: three batches, so the last one moves up twice.
    waiting = [
        stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), resolution=r, steps=20, face_count=2000)).id
        for r in (97, 98, 99)
    ]
    cancel_all(stub, busy)
    events = watch(stub, waiting[-1])
    positions = [e.queue_position for e in events if e.kind == pb.EVENT_KIND_QUEUED]
    assert len(positions) >= 2 and positions == sorted(positions, reverse=True), positions
    assert len(set(positions)) == len(positions)
    assert events[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED
    for job_id in waiting[:-1]:
        watch(stub, job_id)
