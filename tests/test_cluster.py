"""Several generation instances on one PostgreSQL, with real processes (issue 12).

1. The launcher (`GENERATION_INSTANCES=2`, what `make run` starts) with its private PostgreSQL, the
   gateway and telemetry: 40 jobs through the gateway all succeed, both instances run some, each job
   runs to its end exactly once; one instance is killed with SIGKILL in the middle of a batch and all 40
   still succeed with intact checksums, and SSE streams that were served through it end with their
   terminal event, no gap, no repeat.
2. Two instances on the suite's PostgreSQL: a cancel sent to one stops a job running on the other;
   a request id is one job whichever instance is asked; the queue limit holds over both; PostgreSQL
   stopped for a few seconds gives new requests 503 UNAVAILABLE with a clear message, and once it is
   back the work resumes and nothing accepted is lost.

The slow test backend (tests/slow_backend.py: `steps` seconds of shape_generation, over gRPC) keeps jobs
running long enough to cancel or queue behind.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import shutil
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import grpc
import httpx
import pytest

from bench.launcher import Launcher, alive, wait_for
from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.common.logging_setup import read_log
from services.stack import Stack, free_port
from tests.conftest import ARTIFACTS
from tests.images import disk_png
from tests.postgres_fixtures import PostgresServer, reachable_temp_dir

# Through the gateway (which knows the real backends only): a few tenths of a second of inflate each.
MEDIUM = {"resolution": "384", "steps": "200", "face_count": "4000", "texture": "false"}
TERMINAL = ("succeeded", "failed", "cancelled")


def consecutive_free_ports(count: int) -> int:
    """The first of `count` free loopback ports in a row (GENERATION_PORT, +1, ...)."""
    for _ in range(200):
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no run of free ports")


def submit(url: str, seed: int, **fields: str) -> str:
    r = httpx.post(
        f"{url}/api/v1/generations",
        files={"image": ("disk.png", disk_png(), "image/png")},
        data={**MEDIUM, "seed": str(seed), **fields},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def get_job(client: httpx.Client, job_id: str) -> dict[str, Any] | None:
    """The job, or None while no instance could answer (one just died: the next poll gets another)."""
    r = client.get(f"/api/v1/generations/{job_id}")
    if r.status_code == 503:
        return None
    assert r.status_code == 200, r.text
    return r.json()


def follow_sse(
    url: str, job_id: str, into: dict[str, list[tuple[int, str]]], opened: threading.Event | None = None
) -> None:
    """A browser-style SSE reader: every (id, event) until the server closes the stream; `opened` is set
    once the first event has arrived (the gateway is following the job on some instance)."""
    seen: list[tuple[int, str]] = []
    with httpx.stream("GET", f"{url}/api/v1/generations/{job_id}/events", timeout=180) as response:
        assert response.status_code == 200
        sequence, name = 0, ""
        for line in response.iter_lines():
            if line.startswith("id:"):
                sequence = int(line[3:])
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line == "" and name:
                seen.append((sequence, name))
                sequence, name = 0, ""
                if opened is not None:
                    opened.set()
    into[job_id] = seen


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ------------------------------------------------------------------ 1. the launcher, two instances


@pytest.fixture
def two_instance_launcher() -> Iterator[Launcher]:
    # The private PostgreSQL runs as `postgres`, who must be able to enter DATA_DIR.
    data = reachable_temp_dir("orfeas-cluster-")
    ports = {
        "GATEWAY_PORT": free_port(),
        "GENERATION_PORT": consecutive_free_ports(2),
        "TELEMETRY_PORT": free_port(),
        "GENERATION_METRICS_PORT": 0,
        "TELEMETRY_METRICS_PORT": 0,
    }
    launcher = Launcher(
        "cluster-launcher",
        data,
        {
            "GENERATION_INSTANCES": "2",
            "GENERATION_BACKEND_PLUGINS": "tests.slow_backend",
            "GENERATION_MAX_BATCH_SIZE": "4",
            "GENERATION_QUEUE_LIMIT": "100",
            "GENERATION_MAX_ATTEMPTS": "3",
            # A job that was running on a killed instance is back in the queue within seconds.
            "GENERATION_LEASE_S": "3",
            "GENERATION_EXPORT_PROCESSES": "0",
        },
        ARTIFACTS / "logs",
        ports=ports,
    ).start()
    try:
        yield launcher
    finally:
        launcher.close()
        shutil.rmtree(data, ignore_errors=True)


def test_two_instances_share_40_jobs_and_survive_kill_9_of_one(two_instance_launcher: Launcher) -> None:
    stack = two_instance_launcher
    parts = stack.wait_up()
    assert set(parts) == {"postgres", "telemetry", "generation-1", "generation-2", "gateway"}
    port_1 = stack.ports["GENERATION_PORT"]
    url = stack.url

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda seed: submit(url, seed), range(40)))
    # Six browser-style streams opened one after another: round robin serves them from both instances.
    streams: dict[str, list[tuple[int, str]]] = {}
    opened = [threading.Event() for _ in ids[-6:]]
    followers = [threading.Thread(target=follow_sse, args=(url, i, streams, o)) for i, o in zip(ids[-6:], opened)]
    for follower in followers:
        follower.start()
        time.sleep(0.05)
    # Every stream is open, on one instance or the other, before one of them dies.
    assert all(o.wait(30) for o in opened), "an SSE stream did not open"

    with httpx.Client(base_url=url, timeout=30) as client:
        # Kill instance 1 while it has a batch under way.
        def running_on_1() -> bool:
            r = client.get("/api/v1/generations", params={"status": "running", "page_size": 100})
            return any(j["worker_id"].endswith(f":{port_1}/cpu") for j in r.json()["generations"])

        wait_for("a batch running on generation-1", running_on_1, 60, 0.02)
        killed = stack.kill_part("generation-1")
        dead_by = time.time()

        def all_ended() -> dict[str, dict[str, Any]] | None:
            jobs = {i: get_job(client, i) for i in ids}
            return jobs if all(j and j["status"] in TERMINAL for j in jobs.values()) else None

        jobs = wait_for("all 40 jobs to end", all_ended, 150, 0.5)
        assert Counter(j["status"] for j in jobs.values()) == {"succeeded": 40}, [
            j["error"] for j in jobs.values() if j["status"] != "succeeded"
        ]
        # Both instances ran jobs; some were running on the killed one and ran again elsewhere.
        instances = Counter(j["worker_id"].rsplit("/", 1)[0].rsplit(":", 1)[1] for j in jobs.values())
        assert set(instances) == {str(port_1), str(port_1 + 1)}, instances
        assert any(j["attempts"] == 2 for j in jobs.values()), "no job was running on the killed instance"

        # Every result downloads whole: the checksum the gateway sends matches the bytes.
        for job_id in ids:
            r = client.get(f"/api/v1/generations/{job_id}/result")
            assert r.status_code == 200, r.text
            assert r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'

    # Each job ran to its end exactly once: one "job finished" line across both instances' logs. The
    # line follows the commit of the job's end, so a job that generation-1 ended just before it died may
    # have none; but only such a job.
    finished = Counter(e["job_id"] for e in read_log(stack.log_file) if e.get("msg") == "job finished")
    assert max(finished.values()) == 1, finished
    for job_id in set(ids) - set(finished):
        job = jobs[job_id]
        ended_at = datetime.fromisoformat(job["finished_at"]).timestamp()
        assert job["worker_id"].endswith(f":{port_1}/cpu") and ended_at <= dead_by, (job_id, job)

    for follower in followers:
        follower.join(60)
    assert set(streams) == set(ids[-6:])
    for job_id, events in streams.items():
        assert [s for s, _ in events] == list(range(1, len(events) + 1)), (job_id, events)  # no gap, no repeat
        assert events[-1][1] == "succeeded" and [n for _, n in events].count("succeeded") == 1, events
    # At least one of them was being served by the instance that died, and went on elsewhere.
    assert metric(url, 'orfeas_event_stream_resumes_total{transport="sse"}') >= 1
    assert not alive(killed)
    stack.wait_back("generation-1", killed)


# ------------------------------------------------------------------ 2. two instances on the suite's PostgreSQL


@pytest.fixture(scope="module")
def cluster(postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("cluster")
    log_dir = ARTIFACTS / "logs" / "cluster"
    shutil.rmtree(log_dir, ignore_errors=True)
    stack = Stack(
        gateway_port=free_port(),
        generation_port=consecutive_free_ports(2),
        telemetry_port=free_port(),
        generation_metrics_port=0,
        telemetry_metrics_port=0,
        data_dir=tmp / "data",
        extra_env={
            "GENERATION_BACKEND_PLUGINS": "tests.slow_backend",
            "GENERATION_MAX_BATCH_SIZE": "1",
            "GENERATION_QUEUE_LIMIT": "3",
            "GENERATION_DATABASE_TIMEOUT_S": "2",
            "GENERATION_EXPORT_PROCESSES": "0",
        },
        log_dir=log_dir,
        generation_instances=2,
        database_url=postgres.database(),
    )
    stack.start_all()
    yield stack
    stack.stop_all()


def stubs(stack: Stack) -> Iterator[generation_pb2_grpc.GenerationServiceStub]:
    for part in stack.generation_parts:
        yield generation_pb2_grpc.GenerationServiceStub(grpc.insecure_channel(stack.instance_address(part)))


def slow_request(seconds: int, **fields: Any) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=disk_png(), backend="slow", steps=seconds, resolution=64, face_count=1000, texture=False, **fields
    )


def wait_status(stub, job_id: str, statuses: tuple[int, ...], timeout_s: float = 60) -> pb.Generation:
    return wait_for(
        f"{job_id} in {statuses}",
        lambda: (g := stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10)).status in statuses and g,
        timeout_s,
        0.05,
    )


def test_a_cancel_sent_to_one_instance_stops_a_job_running_on_the_other(cluster: Stack) -> None:
    a, b = stubs(cluster)
    job = a.SubmitGeneration(slow_request(60), timeout=30)
    running = wait_status(a, job.id, (pb.JOB_STATUS_RUNNING,))
    runs_on_a = running.worker_id.split("/")[0].endswith(f":{cluster.generation_port}")
    # Whichever instance runs it, the cancel goes to the other one.
    other = b if runs_on_a else a
    started = time.monotonic()
    cancelled = other.CancelGeneration(pb.CancelGenerationRequest(id=job.id), timeout=10)
    assert cancelled.cancel_requested
    done = wait_status(a, job.id, (pb.JOB_STATUS_CANCELLED,), 20)
    assert time.monotonic() - started < 10, "the running instance should stop at its next step, not after 60 s"
    assert done.worker_id == running.worker_id and done.error.code == "CANCELLED"
    events = list(b.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=10))
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    assert events[-1].kind == pb.EVENT_KIND_TERMINAL and events[-1].outcome.status == pb.JOB_STATUS_CANCELLED


def test_a_request_id_is_one_job_on_every_instance_and_the_queue_limit_holds_over_both(cluster: Stack) -> None:
    a, b = stubs(cluster)
    first = a.SubmitGeneration(slow_request(1, request_id="order-42"), timeout=30)
    again = b.SubmitGeneration(slow_request(1, request_id="order-42"), timeout=30)
    assert again.id == first.id
    with pytest.raises(grpc.RpcError) as other_payload:
        b.SubmitGeneration(slow_request(2, request_id="order-42"), timeout=30)
    assert other_payload.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert other_payload.value.details().startswith("request_id:")
    done = wait_status(a, first.id, (pb.JOB_STATUS_SUCCEEDED,))
    # Whichever instance ran it, the other one serves it: a format first written on this download (from the
    # job's kept source) and the cut-out (from the kept picture and mask), both off the shared folder.
    maker = a if done.worker_id.split("/")[0].endswith(f":{cluster.generation_port}") else b
    other = b if maker is a else a
    for download in (
        other.DownloadResult(pb.DownloadResultRequest(id=first.id, format=pb.MESH_FORMAT_STL), timeout=60),
        other.DownloadCutout(pb.DownloadCutoutRequest(id=first.id), timeout=60),
        maker.DownloadResult(pb.DownloadResultRequest(id=first.id, format=pb.MESH_FORMAT_STL), timeout=60),
    ):
        chunks = list(download)
        data = b"".join(c.data for c in chunks)
        assert data and hashlib.sha256(data).hexdigest() == chunks[0].sha256
    written = maker.GetGeneration(pb.GetGenerationRequest(id=first.id), timeout=10).result.sizes
    assert {s.format for s in written} == {pb.MESH_FORMAT_GLB, pb.MESH_FORMAT_STL}, written

    # Long jobs from both instances until the cluster's queue (limit 3) is full: each instance runs and
    # prepares some, and exactly three wait, counted over both.
    accepted: list[str] = []
    refused: list[grpc.RpcError] = []
    for turn in range(20):
        try:
            accepted.append((a, b)[turn % 2].SubmitGeneration(slow_request(60), timeout=30).id)
        except grpc.RpcError as exc:
            refused.append(exc)
            if len(refused) == 2:
                break
            time.sleep(1.0)  # let the instances claim what they will before the next try
    assert len(refused) == 2, "the queue never filled"
    for exc in refused:  # both instances said no
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "3 jobs waiting across the cluster (limit 3)" in exc.details(), exc.details()
        assert dict(exc.trailing_metadata()).get("retry-after", "").isdigit()
    for stub in (a, b):
        queued = stub.ListGenerations(pb.ListGenerationsRequest(status=pb.JOB_STATUS_QUEUED), timeout=10)
        assert sorted(g.queue_position for g in queued.generations) == [1, 2, 3]
    for job_id in accepted:
        b.CancelGeneration(pb.CancelGenerationRequest(id=job_id), timeout=10)
    for job_id in accepted:
        wait_status(a, job_id, (pb.JOB_STATUS_CANCELLED,), 30)


def test_postgres_stopped_for_a_few_seconds_refuses_new_work_clearly_and_loses_nothing(
    cluster: Stack, postgres: PostgresServer
) -> None:
    a, _ = stubs(cluster)
    with httpx.Client(base_url=cluster.gateway_url, timeout=30) as client:
        accepted = [a.SubmitGeneration(slow_request(2), timeout=30).id for _ in range(3)]
        wait_for("a job running", lambda: any(
            (j := get_job(client, i)) and j["status"] == "running" for i in accepted), 30, 0.05)
        postgres.stop()
        try:
            r = client.post(
                "/api/v1/generations", files={"image": ("disk.png", disk_png(), "image/png")}, data=MEDIUM
            )
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "UNAVAILABLE"
            assert "job database (PostgreSQL at 127.0.0.1:" in error["message"], error
            assert "unreachable" in error["message"] and "retry" in error["message"]
            assert client.get(f"/api/v1/generations/{accepted[0]}").status_code == 503
            time.sleep(2)
        finally:
            postgres.start()
        # Back: the accepted jobs finish (none lost, none failed), and new work is taken again.
        late = wait_for("a submission accepted again", lambda: _try_submit(cluster.gateway_url), 30, 0.5)
        for job_id in [*accepted, late]:
            job = wait_for(f"{job_id} to end", lambda job_id=job_id: (j := get_job(client, job_id)) and
                           j["status"] in TERMINAL and j, 90, 0.2)
            assert job["status"] == "succeeded", job["error"]


def _try_submit(url: str) -> str | None:
    r = httpx.post(
        f"{url}/api/v1/generations",
        files={"image": ("disk.png", disk_png(), "image/png")},
        data=MEDIUM,
        timeout=30,
    )
    return r.json()["id"] if r.status_code == 202 else None
