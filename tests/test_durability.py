"""Nothing accepted is lost: crashes, restarts, retention, idempotency across restarts.

Each test runs its own stack, killed and restarted for real as subprocesses.
"""
from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.stack import Stack
from tests.conftest import new_stack
from tests.images import disk_png, photo_png

SMALL = dict(resolution=96, steps=20, face_count=2000, texture_size=256)


def stub_for(stack: Stack) -> tuple[grpc.Channel, generation_pb2_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(stack.generation_address)
    return channel, generation_pb2_grpc.GenerationServiceStub(channel)


def status_of(stub, job_id: str) -> int:
    return stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10).status


def wait_all_terminal(stub, ids: list[str], timeout_s: float = 240) -> dict[str, pb.Generation]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        jobs = {i: stub.GetGeneration(pb.GetGenerationRequest(id=i), timeout=10) for i in ids}
        if all(j.status in (pb.JOB_STATUS_SUCCEEDED, pb.JOB_STATUS_FAILED, pb.JOB_STATUS_CANCELLED) for j in jobs.values()):
            return jobs
        time.sleep(0.3)
    raise AssertionError(f"not all jobs ended: {[pb.JobStatus.Name(j.status) for j in jobs.values()]}")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child its new parent has not reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def download(stub, job_id: str) -> tuple[bytes, str]:
    chunks = list(stub.DownloadResult(pb.DownloadResultRequest(id=job_id), timeout=60))
    return b"".join(c.data for c in chunks), chunks[0].sha256


def test_kill_9_half_way_loses_nothing(tmp_path):
    # Every export in a worker process, so the crash also hits that path.
    stack = new_stack(tmp_path, "kill9", GENERATION_EXPORT_INLINE_MAX_FACES="0")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        ids = [stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), seed=i, **SMALL)).id for i in range(20)]
        # Let about half finish, then crash the generation service.
        while sum(status_of(stub, i) == pb.JOB_STATUS_SUCCEEDED for i in ids) < 8:
            time.sleep(0.1)
        before = {i: download(stub, i) for i in ids if status_of(stub, i) == pb.JOB_STATUS_SUCCEEDED}
        children = children_of(stack.processes["generation"].pid)
        assert children, "the export processes should be running"
        stack.kill("generation")
        channel.close()
        stack.start("generation")
        channel, stub = stub_for(stack)
        jobs = wait_all_terminal(stub, ids)
        assert len(jobs) == 20
        # The killed service's export processes did not linger as orphans.
        deadline = time.monotonic() + 10
        while [pid for pid in children if running(pid)] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in children if running(pid)]
        assert all(j.status == pb.JOB_STATUS_SUCCEEDED for j in jobs.values()), {
            i: j.error.message for i, j in jobs.items() if j.status != pb.JOB_STATUS_SUCCEEDED
        }
        for job_id in ids:
            data, digest = download(stub, job_id)
            assert hashlib.sha256(data).hexdigest() == digest
            if job_id in before:
                assert (data, digest) == before[job_id]  # byte for byte across the crash
        channel.close()
    finally:
        stack.stop_all()


def test_a_job_interrupted_too_often_fails_with_reason_interrupted(tmp_path):
    stack = new_stack(tmp_path, "interrupted", GENERATION_MAX_ATTEMPTS="1")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), resolution=1024, steps=500, texture=False))
        while status_of(stub, job.id) != pb.JOB_STATUS_RUNNING:
            time.sleep(0.05)
        stack.kill("generation")
        channel.close()
        stack.start("generation")
        channel, stub = stub_for(stack)
        ended = wait_all_terminal(stub, [job.id])[job.id]
        assert ended.status == pb.JOB_STATUS_FAILED and ended.error.code == "interrupted"
        channel.close()
    finally:
        stack.stop_all()


def test_sigterm_finishes_running_work_and_keeps_the_queue(tmp_path):
    stack = new_stack(tmp_path, "sigterm", GENERATION_GRACE_PERIOD_S="30")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        ids = [
            stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), resolution=r, steps=20, face_count=2000)).id
            for r in (200, 201, 202, 203, 204, 205)
        ]
        while status_of(stub, ids[0]) != pb.JOB_STATUS_RUNNING:
            time.sleep(0.05)
        assert stack.stop("generation") == 0
        channel.close()
        stack.start("generation")
        channel, stub = stub_for(stack)
        jobs = wait_all_terminal(stub, ids)
        assert all(j.status == pb.JOB_STATUS_SUCCEEDED for j in jobs.values())
        assert jobs[ids[0]].stage_timings  # it ran before the stop or after; either way it ended well
        channel.close()
    finally:
        stack.stop_all()


def test_restart_each_service_in_turn_while_clients_keep_going(tmp_path):
    stack = new_stack(tmp_path, "rolling")
    stack.start_all()
    accepted: list[str] = []
    refused: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=stack.gateway_url, timeout=30) as http:
            for i in range(200):
                if stop.is_set():
                    return
                try:
                    response = http.post(
                        "/api/v1/generations",
                        files={"image": ("d.png", disk_png(), "image/png")},
                        data={k: str(v) for k, v in SMALL.items()},
                        headers={"Idempotency-Key": f"rolling-{i}"},
                    )
                except httpx.TransportError:
                    time.sleep(0.2)  # the gateway itself is restarting
                    continue
                if response.status_code == 202:
                    accepted.append(response.json()["id"])
                else:
                    refused.append(response.status_code)
                time.sleep(0.1)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        for name in ("telemetry", "generation", "gateway"):
            time.sleep(2)
            stack.stop(name)
            stack.start(name)
        time.sleep(2)
        stop.set()
        worker.join(60)
        assert set(refused) <= {502, 503}, refused
        channel, stub = stub_for(stack)
        jobs = wait_all_terminal(stub, sorted(set(accepted)))
        assert len(jobs) >= 5
        assert all(j.status == pb.JOB_STATUS_SUCCEEDED for j in jobs.values())
        # The gateway holds no state: what it answers after its restart is what the service holds.
        first = next(iter(jobs))
        view = httpx.get(f"{stack.gateway_url}/api/v1/generations/{first}").json()
        assert view["status"] == "succeeded"
        channel.close()
    finally:
        stop.set()
        stack.stop_all()


def test_idempotency_survives_a_restart_and_retention_expires_jobs(tmp_path):
    # Long enough that a restart on a loaded machine ends well before the job expires.
    stack = new_stack(tmp_path, "retention", GENERATION_RETENTION_S="15", GENERATION_RETENTION_INTERVAL_S="0.5")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        request = pb.GenerateRequest(image=disk_png(), request_id="same-key-1", **SMALL)
        job = stub.SubmitGeneration(request)
        wait_all_terminal(stub, [job.id])
        channel.close()
        stack.stop("generation")
        stack.start("generation")
        channel, stub = stub_for(stack)
        assert stub.SubmitGeneration(request).id == job.id
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitGeneration(pb.GenerateRequest(image=photo_png(), request_id="same-key-1", **SMALL))
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        deadline = time.monotonic() + 45
        while (response := httpx.get(f"{stack.gateway_url}/api/v1/generations/{job.id}")).status_code == 200:
            assert time.monotonic() < deadline, "the job did not expire"
            time.sleep(0.5)
        assert response.status_code == 404
        assert "expired" in response.json()["error"]["message"]
        assert not list((stack.data_dir / "artifacts" / "results").glob(f"{job.id}*"))
        channel.close()
    finally:
        stack.stop_all()


def test_a_damaged_result_file_is_refused_not_served(tmp_path):
    stack = new_stack(tmp_path, "damaged")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        end = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=120))[-1]
        path = stack.data_dir / "artifacts" / "results" / end.generation_id / "mesh.glb"
        data = bytearray(path.read_bytes())
        data[100] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(grpc.RpcError) as err:
            download(stub, end.generation_id)
        assert err.value.code() == grpc.StatusCode.DATA_LOSS
        channel.close()
    finally:
        stack.stop_all()


def test_the_artifact_disk_budget_removes_the_oldest_results_first(tmp_path):
    stack = new_stack(tmp_path, "budget", GENERATION_RETENTION_INTERVAL_S="0.3")
    stack.start_all()
    try:
        channel, stub = stub_for(stack)
        first = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=120))[-1]
        # Everything a job keeps: its file, the source of its other formats, its picture and cut-out mask.
        folder = stack.data_dir / "artifacts" / "results" / first.generation_id
        deadline = time.monotonic() + 10
        while not (folder / "input").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the picture moves beside the results just after the job's end
        one_job = sum(p.stat().st_size for p in folder.iterdir())
        channel.close()
        # Room for two and a half jobs' files.
        stack.stop("generation")
        stack.extra_env["GENERATION_ARTIFACT_BUDGET_MB"] = str(2.5 * one_job / 2**20)
        stack.start("generation")
        channel, stub = stub_for(stack)
        later = [list(stub.Generate(pb.GenerateRequest(image=disk_png(), seed=i, **SMALL), timeout=120))[-1]
                 for i in range(3)]
        time.sleep(1.0)
        response = httpx.get(f"{stack.gateway_url}/api/v1/generations/{first.generation_id}")
        assert response.status_code == 404 and "disk budget" in response.json()["error"]["message"]
        for end in later[-2:]:
            data, digest = download(stub, end.generation_id)
            assert hashlib.sha256(data).hexdigest() == digest
        channel.close()
    finally:
        stack.stop_all()
