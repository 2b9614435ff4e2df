"""Faults never wedge the service (issue 14): real faults on real processes.

- a hung stage (a test-only backend that never returns): the watchdog gives it up, the next job runs,
  and the background task that failed meanwhile is logged once;
- an export process killed mid-export: the job is retried and succeeds; one whose cancel is pending
  ends cancelled, as does one whose cancel is pending when a graceful stop gives running jobs back;
- a tmpfs DATA_DIR that fills and then grows: clean 507s, no job stuck, work resumes without a restart.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.stack import Stack
from tests.conftest import new_stack
from tests.images import disk_png
from tests.lifecycle_helpers import TERMINAL, check_ended_consistently, stored_job, wait_until
from tests.logs import entries

SMALL = dict(resolution=96, steps=20, face_count=2000, texture_size=256)


def connect(stack: Stack) -> tuple[grpc.Channel, generation_pb2_grpc.GenerationServiceStub]:
    channel = grpc.insecure_channel(stack.generation_address)
    return channel, generation_pb2_grpc.GenerationServiceStub(channel)


def get(stub, job_id: str) -> pb.Generation:
    return stub.GetGeneration(pb.GetGenerationRequest(id=job_id), timeout=10)


def ended(stub, job_id: str, timeout_s: float = 120) -> pb.Generation:
    return wait_until(lambda: (g := get(stub, job_id)).status in TERMINAL and g, timeout_s, 0.1, f"{job_id} to end")


def export_processes(parent: int) -> list[int]:
    """The generation service's export worker processes (spawned children; not the resource tracker)."""
    out = subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "multiprocessing" in cmdline and "resource_tracker" not in cmdline:
            pids.append(pid)
    return pids


def test_a_hung_stage_is_given_up_and_the_next_job_runs(tmp_path):
    stack = new_stack(
        tmp_path,
        "hung",
        GENERATION_BACKEND_PLUGINS="tests.hanging_backend",
        GENERATION_STALL_S="2",
        GENERATION_MAX_ATTEMPTS="2",
    )
    stack.start_all()
    channel, stub = connect(stack)
    try:
        hung = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), backend="hang"))
        after = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **SMALL))
        final = ended(stub, hung.id, 60)
        assert final.status == pb.JOB_STATUS_FAILED and final.error.code == "stalled", final.error
        assert final.attempts == 2  # requeued once, then out of attempts
        assert ended(stub, after.id, 60).status == pb.JOB_STATUS_SUCCEEDED
        check_ended_consistently(stub, stack.data_dir, hung.id)
        # Each run's failed progress task was logged once, and the service went on.
        failures = entries(stack.log_dir / "generation.log", "background task failed")
        assert len(failures) == 2, failures
        ok = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=60))[-1]
        assert ok.outcome.status == pb.JOB_STATUS_SUCCEEDED
        channel.close()
        # The threads stuck in the backend do not keep the service from stopping.
        assert stack.stop("generation", timeout_s=30) == 0
    finally:
        channel.close()
        stack.stop_all()


def test_a_killed_export_process_is_retried_and_the_job_succeeds(tmp_path):
    stack = new_stack(tmp_path, "export-kill", GENERATION_EXPORT_INLINE_MAX_FACES="0")
    stack.start_all()
    channel, stub = connect(stack)
    try:
        # A budget so small that the disk's outline alone would overrun it: the backend hands over its whole
        # mesh and mesh_export decimates it, in an export process, for most of a second.
        job = stub.SubmitGeneration(
            pb.GenerateRequest(image=disk_png(512), resolution=512, face_count=1000, texture=False)
        )
        wait_until(
            lambda: get(stub, job.id).stage == pb.STAGE_MESH_EXPORT, 60, 0.02, "mesh_export to start"
        )
        victims = export_processes(stack.processes["generation"].pid)
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
        final = ended(stub, job.id)
        assert final.status == pb.JOB_STATUS_SUCCEEDED, final.error
        assert final.attempts == 2
        check_ended_consistently(stub, stack.data_dir, job.id)
        events = list(stub.WatchGeneration(pb.WatchGenerationRequest(id=job.id), timeout=30))
        assert any(e.kind == pb.EVENT_KIND_QUEUED for e in events[4:]), "it went back to the queue"
    finally:
        channel.close()
        stack.stop_all()


def _in_export_with_a_cancel_pending(stub) -> pb.Generation:
    """A job whose mesh_export runs in an export process for most of a second (see the test above), and
    a cancel accepted meanwhile: the job carries it until its next step boundary."""
    job = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), resolution=512, face_count=1000, texture=False))
    wait_until(lambda: get(stub, job.id).stage == pb.STAGE_MESH_EXPORT, 60, 0.02, "mesh_export to start")
    assert stub.CancelGeneration(pb.CancelGenerationRequest(id=job.id), timeout=10).status == pb.JOB_STATUS_RUNNING
    return job


def test_a_cancel_pending_when_the_export_process_dies_ends_the_job_cancelled(tmp_path):
    """Found by the cluster soak: requeued after the fault, the job kept its cancel, which no claim takes,
    and waited in the queue for ever (and, on one instance, kept the jobs behind it waiting too)."""
    stack = new_stack(tmp_path, "export-kill-cancel", GENERATION_EXPORT_INLINE_MAX_FACES="0")
    stack.start_all()
    channel, stub = connect(stack)
    try:
        job = _in_export_with_a_cancel_pending(stub)
        for pid in export_processes(stack.processes["generation"].pid):
            os.kill(pid, signal.SIGKILL)
        final = ended(stub, job.id, 60)
        assert final.status == pb.JOB_STATUS_CANCELLED, final
        assert "the fault that ended its run came first" in final.error.message, final.error
        assert final.attempts == 1
        check_ended_consistently(stub, stack.data_dir, job.id)
        ok = list(stub.Generate(pb.GenerateRequest(image=disk_png(), **SMALL), timeout=60))[-1]
        assert ok.outcome.status == pb.JOB_STATUS_SUCCEEDED
    finally:
        channel.close()
        stack.stop_all()


def test_a_cancel_pending_at_a_graceful_stop_ends_the_job_cancelled_not_queued(tmp_path):
    """The stop gives running jobs back to the queue, but not one whose client asked to cancel it: on a
    cluster no other instance would ever take it."""
    stack = new_stack(tmp_path, "stop-cancel", GENERATION_EXPORT_INLINE_MAX_FACES="0", GENERATION_GRACE_PERIOD_S="0.1")
    stack.start_all()
    channel, stub = connect(stack)
    try:
        job = _in_export_with_a_cancel_pending(stub)
        channel.close()
        assert stack.stop("generation") == 0
        stored = stored_job(stack.data_dir, job.id)
        assert stored is not None and stored.status == "cancelled", stored
        stack.start("generation")
        channel, stub = connect(stack)
        final = check_ended_consistently(stub, stack.data_dir, job.id)
        assert final.status == pb.JOB_STATUS_CANCELLED
        assert "the service stopped before the job could" in final.error.message, final.error
    finally:
        channel.close()
        stack.stop_all()


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of its own for DATA_DIR (this machine's CI runs as root, which mounting needs)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; CI runs as root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Write a filler file until only about `leave_bytes` are free."""
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    size = max(0, free - leave_bytes)
    with open(filler, "ab") as f:
        try:
            f.write(b"\0" * size)
        except OSError:
            pass
    return filler


def test_a_full_disk_is_a_clean_temporary_refusal(small_disk: Path):
    stack = new_stack(small_disk, "full-disk", GENERATION_MIN_FREE_MB="8", GENERATION_MAX_ATTEMPTS="3")
    stack.start_all()
    channel, stub = connect(stack)
    http = httpx.Client(base_url=stack.gateway_url, timeout=60)
    try:
        # Jobs are accepted and running, then the disk fills up under them.
        accepted = [
            stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(512), seed=i, resolution=512, face_count=20000)).id
            for i in range(4)
        ]
        wait_until(lambda: get(stub, accepted[0]).status == pb.JOB_STATUS_RUNNING, 30)
        fill(small_disk, 0)
        time.sleep(3)
        refused = http.post(
            "/api/v1/generations",
            files={"image": ("d.png", disk_png(), "image/png")},
            data={k: str(v) for k, v in SMALL.items()},
        )
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["message"].startswith("storage:")
        assert "Retry-After" in refused.headers
        ready = http.get("/readyz").json()
        assert ready["status"] == "degraded" and "storage" in ready["degraded"], ready
        metrics = httpx.get(f"http://127.0.0.1:{stack.generation_metrics_port}/metrics").text
        assert "orfeas_storage_free_bytes" in metrics
        # Space returns: no restart, no hand step.
        subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
        wait_until(lambda: http.get("/readyz").json()["status"] == "ready", 30, 0.2, "readiness to return")
        for job_id in accepted:
            final = ended(stub, job_id, 180)
            # Each ends: succeeded, or (had the disk stayed full through every attempt) storage_full.
            assert final.status == pb.JOB_STATUS_SUCCEEDED or final.error.code == "storage_full", final.error
            check_ended_consistently(stub, stack.data_dir, job_id)
        assert any(get(stub, j).status == pb.JOB_STATUS_SUCCEEDED for j in accepted)
        new = http.post(
            "/api/v1/generations",
            files={"image": ("d.png", disk_png(), "image/png")},
            data={k: str(v) for k, v in SMALL.items()},
        )
        assert new.status_code == 202, new.text
        assert ended(stub, new.json()["id"]).status == pb.JOB_STATUS_SUCCEEDED
    finally:
        http.close()
        channel.close()
        stack.stop_all()
