"""One regression test per defect of issue 16, each on a real stack of its own.

1. an SSE stream outlives a quiet spell longer than its keep-alive interval;
2. a retention sweep that meets another process's lock waits, and poisons nothing;
3. a cancel accepted for a queued job always ends it cancelled;
4. the store commits before memory changes: a lock held through a job's end leaves API, row and event agreeing;
5. SQLite never blocks the event loop: health and status answer while another process holds the lock;
6. a cancel, and a Generate caller's cancel-on-disconnect, survive kill -9;
7. a graceful stop gives the attempt back.
Plus: a WebSocket whose client vanishes is noticed before the next event, and a graceful stop that meets
a write waiting on another process's lock still ends (found by the life-cycle property test).
"""
from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import grpc
import httpx
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.stack import Stack
from tests.conftest import new_stack
from tests.images import disk_png
from tests.lifecycle_helpers import (
    TERMINAL,
    check_ended_consistently,
    stored_job,
    wait_until,
    write_lock_held,
)

TINY = dict(resolution=64, steps=5, face_count=1000, texture=False)
SMALL = dict(resolution=96, steps=20, face_count=2000, texture_size=256)
# A job that spends 4 s in a quiet shape_generation (the test-only `slow` backend, tests/slow_backend.py,
# which stops within 0.1 s when asked): a window that does not shrink as the real stages get faster.
SLOW = dict(backend="slow", resolution=96, steps=4, face_count=2000, texture=False)


def channel_for(stack: Stack) -> tuple[grpc.Channel, generation_pb2_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(stack.generation_address)
    return channel, generation_pb2_grpc.GenerationServiceStub(channel)


def get(stub, job_id: str) -> pb.Generation:
    return stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10)


def ended(stub, job_id: str, timeout_s: float = 120) -> pb.Generation:
    return wait_until(lambda: (g := get(stub, job_id)).status in TERMINAL and g, timeout_s, 0.1, f"{job_id} to end")


def in_stage(stub, job_id: str, stage: int) -> bool:
    job = get(stub, job_id)
    return job.status == pb.JOB_STATUS_RUNNING and job.stage == stage


@pytest.fixture
def started(tmp_path, request):
    stacks: list[Stack] = []

    def start(name: str, **env: str) -> Stack:
        stack = new_stack(tmp_path, name, GENERATION_BACKEND_PLUGINS="tests.slow_backend", **env)
        stack.start_all()
        stacks.append(stack)
        return stack

    yield start
    for stack in stacks:
        stack.stop_all()


def test_sse_stream_outlives_quiet_spells_longer_than_its_keepalive(started):
    stack = started("sse-quiet", GATEWAY_SSE_KEEPALIVE_S="0.2")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    names: list[str] = []
    keepalives = 0
    with httpx.Client(base_url=stack.gateway_url, timeout=120) as http:
        with http.stream("GET", f"/api/v1/generations/{job.id}/events") as response:
            for line in response.iter_lines():
                if line.startswith(": keep-alive"):
                    keepalives += 1
                elif line.startswith("event:"):
                    names.append(line[6:].strip())
    # shape_generation sends nothing for seconds, many keep-alive intervals, and the stream still saw the end.
    assert keepalives >= 3, keepalives
    assert names[-1] == "succeeded", names
    channel.close()


def test_a_websocket_whose_client_vanishes_is_noticed_before_the_next_event(started):
    import websockets.sync.client

    stack = started("ws-vanish")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))

    def subscribers() -> float:
        text = httpx.get(f"{stack.gateway_url}/metrics").text
        for line in text.splitlines():
            if line.startswith('orfeas_event_subscribers{transport="websocket"}'):
                return float(line.split()[-1])
        return 0.0

    wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    ws_url = stack.gateway_url.replace("http", "ws") + f"/api/v1/generations/{job.id}/ws"
    with websockets.sync.client.connect(ws_url) as ws:
        json.loads(ws.recv())  # the first past event: the stream is open
        wait_until(lambda: subscribers() == 1.0, 10, what="the subscriber to count")
    # Closed while shape_generation runs: no event is due for seconds.
    wait_until(lambda: subscribers() == 0.0, 1.0, what="the vanished client to be noticed")
    assert in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION)
    channel.close()


def test_retention_meeting_a_lock_waits_and_poisons_nothing(started):
    stack = started("retention-lock", GENERATION_RETENTION_S="2", GENERATION_RETENTION_INTERVAL_S="0.3")
    channel, stub = channel_for(stack)
    old = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=60))[-1].generation_id
    http = httpx.Client(base_url=stack.gateway_url, timeout=60)
    with write_lock_held(stack.data_dir, 6.0):
        time.sleep(2.5)  # the old job is due for expiry, and the sweep is waiting for the lock
        # Until its record goes, the job is whole: status and file.
        assert http.get(f"/api/v1/generations/{old}").json()["status"] == "succeeded"
        assert http.get(f"/api/v1/generations/{old}/result").status_code == 200
        # A submission during the lock is accepted once the lock is gone.
        response = http.post(
            "/api/v1/generations",
            files={"image": ("d.png", disk_png(), "image/png")},
            data={k: str(v) for k, v in SMALL.items()},
        )
    assert response.status_code == 202, response.text
    new = response.json()["id"]
    assert ended(stub, new).status == pb.JOB_STATUS_SUCCEEDED
    gone = wait_until(lambda: (r := http.get(f"/api/v1/generations/{old}")).status_code == 404 and r, 10)
    assert "expired" in gone.json()["error"]["message"]
    result = http.get(f"/api/v1/generations/{old}/result")
    assert result.status_code == 404 and str(stack.data_dir) not in result.text
    # Nothing accepted vanished with a restart: the new job is there, or expired with a reason.
    channel.close()
    stack.stop("generation")
    stack.start("generation")
    # The gateway's channel reconnects within its back-off (two seconds at most); until then it says 503.
    after = wait_until(lambda: (r := http.get(f"/api/v1/generations/{new}")).status_code != 503 and r, 10)
    assert after.json().get("status") == "succeeded" or "expired" in after.json()["error"]["message"], after.text
    http.close()


def test_a_cancel_accepted_for_a_queued_job_always_ends_it_cancelled(started):
    stack = started("cancel-race", GENERATION_MAX_QUEUE_DELAY_MS="1")
    channel, stub = channel_for(stack)

    def pair(seed: int) -> tuple[str, pb.Generation]:
        job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(128), seed=seed, **TINY), timeout=30)
        return job.id, stub.CancelGeneration(pb.CancelGenerationRequest(id=job.id), timeout=30)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        pairs = list(pool.map(pair, range(160)))
    cancel_taken = 0
    for job_id, answer in pairs:
        final = ended(stub, job_id, 120)
        if answer.status == pb.JOB_STATUS_CANCELLED or answer.cancel_requested:
            cancel_taken += 1
            assert final.status == pb.JOB_STATUS_CANCELLED, (job_id, pb.JobStatus.Name(final.status))
        check_ended_consistently(stub, stack.data_dir, job_id)
    assert cancel_taken >= 100  # most cancels reach their job while it waits
    channel.close()


def test_a_lock_through_a_job_end_leaves_api_row_and_event_agreeing(started):
    stack = started("lock-finish")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    # The job ends while the lock is held, for longer than SQLite's own busy wait: the job's end
    # must wait for the lock, not half-happen.
    with write_lock_held(stack.data_dir, 12.0):
        pass
    final = ended(stub, job.id)
    check_ended_consistently(stub, stack.data_dir, job.id)
    assert final.status == pb.JOB_STATUS_SUCCEEDED, final.error.message
    channel.close()


def test_health_and_status_answer_while_another_process_holds_the_lock(started):
    stack = started("lock-loop")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    slowest = 0.0
    with write_lock_held(stack.data_dir, 6.0) as holder:
        with httpx.Client(base_url=stack.gateway_url, timeout=10) as http:
            while holder.poll() is None:
                began = time.monotonic()
                assert http.get("/readyz").status_code == 200
                assert get(stub, job.id).status == pb.JOB_STATUS_RUNNING  # the end waits for the lock
                slowest = max(slowest, time.monotonic() - began)
                time.sleep(0.2)
    assert slowest < 1.0, f"a call waited {slowest:.1f}s: the event loop was blocked"
    assert ended(stub, job.id).status == pb.JOB_STATUS_SUCCEEDED
    channel.close()


def test_a_cancel_and_a_cancel_on_disconnect_survive_kill_9(started):
    stack = started("cancel-kill", GENERATION_MAX_ATTEMPTS="5")
    channel, stub = channel_for(stack)
    running = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    # A Generate caller that wants its job to end with its call, queued behind the running one.
    follow = stub.Generate(pb.GenerateRequest(image=disk_png(), cancel_on_disconnect=True, **SMALL), timeout=120)
    follower = next(follow).generation_id
    wait_until(lambda: in_stage(stub, running.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    answer = stub.CancelGeneration(pb.CancelGenerationRequest(id=running.id))
    assert answer.status in (pb.JOB_STATUS_RUNNING, pb.JOB_STATUS_CANCELLED)  # accepted: not ended otherwise
    stack.kill("generation")
    follow.cancel()
    channel.close()
    stack.start("generation")
    channel, stub = channel_for(stack)
    for job_id in (running.id, follower):
        final = ended(stub, job_id)
        assert final.status == pb.JOB_STATUS_CANCELLED, (job_id, pb.JobStatus.Name(final.status))
        check_ended_consistently(stub, stack.data_dir, job_id)
    assert "restart" in get(stub, follower).error.message
    channel.close()


def test_graceful_stops_give_the_attempt_back(started):
    stack = started("graceful", GENERATION_GRACE_PERIOD_S="0.3", GENERATION_MAX_ATTEMPTS="2")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    for _ in range(2):
        wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
        channel.close()
        assert stack.stop("generation") == 0
        stored = stored_job(stack.data_dir, job.id)
        assert stored is not None and stored.status == "queued" and stored.attempts == 0
        stack.start("generation")
        channel, stub = channel_for(stack)
    final = ended(stub, job.id)
    assert final.status == pb.JOB_STATUS_SUCCEEDED, final.error.message
    assert final.attempts == 1
    check_ended_consistently(stub, stack.data_dir, job.id)
    channel.close()


def test_a_graceful_stop_that_meets_a_write_waiting_on_a_lock_ends_and_requeues(started):
    """The stop cancels the device loop while it waits to record the end of shape_generation. That
    handler ends one job and lets its batch-mates go on; it used to swallow the cancel too, so the loop
    went back to waiting for work and the stop waited on it for ever (killed after 30 s)."""
    stack = started("stop-in-write", GENERATION_GRACE_PERIOD_S="0.3")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **{**SLOW, "steps": 2}))
    wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    channel.close()
    with write_lock_held(stack.data_dir, 4.0):
        time.sleep(2.5)  # the 2 s stage is over; its "completed" event waits for the lock
        began = time.monotonic()
        assert stack.stop("generation") == 0, "the stop did not end by itself"
    assert time.monotonic() - began < 10
    stored = stored_job(stack.data_dir, job.id)
    assert stored is not None and stored.status == "queued" and stored.attempts == 0, stored
    stack.start("generation")
    channel, stub = channel_for(stack)
    assert ended(stub, job.id).status == pb.JOB_STATUS_SUCCEEDED
    check_ended_consistently(stub, stack.data_dir, job.id)
    channel.close()


def test_a_watch_ends_with_unavailable_naming_the_restart_and_resumes_after_it(started):
    stack = started("watch-restart", GENERATION_GRACE_PERIOD_S="0.3")
    channel, stub = channel_for(stack)
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), **SLOW))
    seen: list[pb.GenerationEvent] = []
    failure: list[grpc.RpcError] = []

    def follow() -> None:
        try:
            for event in stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=120):
                seen.append(event)
        except grpc.RpcError as exc:
            failure.append(exc)

    thread = threading.Thread(target=follow)
    thread.start()
    wait_until(lambda: in_stage(stub, job.id, pb.STAGE_SHAPE_GENERATION), 60, what="shape_generation")
    stack.stop("generation")
    thread.join(30)
    assert failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE, failure
    assert "restarting" in failure[0].details()
    channel.close()
    stack.start("generation")
    channel, stub = channel_for(stack)
    rest = list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id, after_sequence=seen[-1].sequence), timeout=120))
    everything = [*seen, *rest]
    assert [e.sequence for e in everything] == list(range(1, len(everything) + 1))
    assert everything[-1].kind == pb.EVENT_KIND_TERMINAL
    assert everything[-1].outcome.status == pb.JOB_STATUS_SUCCEEDED
    channel.close()
