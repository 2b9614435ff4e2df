"""`make run` survives its parts: the real launcher (`python -m services.stack`, as `make run` starts it)
on free loopback ports, its children killed for real with SIGKILL.

The children's pids come from /proc (the launcher's children and their command lines), never guessed.
"""
from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from bench.launcher import Launcher, alive, wait_for
from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc
from services.supervisor import Backoff, CrashWindow
from tests.conftest import ARTIFACTS
from tests.images import disk_png

FAST = {"resolution": "96", "steps": "20", "face_count": "2000", "texture_size": "256"}
# One job that holds the worker for several seconds on the CPU (most of it in mesh_export).
SLOW = {"resolution": "1024", "steps": "500", "texture": "false"}
# One job that holds the device for 6 s in a quiet shape_generation (the test-only `slow` backend,
# tests/slow_backend.py, which only gRPC takes): the window does not depend on how fast the real stages are.
ON_THE_DEVICE = {"backend": "slow", "resolution": 96, "steps": 6, "face_count": 2000, "texture": False}


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launcher]]:
    started: list[Launcher] = []

    def _launch(name: str, **extra_env: str) -> Launcher:
        launcher = Launcher(f"supervisor-{name}", tmp_path / name, extra_env, ARTIFACTS / "logs").start()
        started.append(launcher)
        return launcher

    yield _launch
    for launcher in started:
        launcher.close()


# ------------------------------------------------------------------ REST helpers


def submit(url: str, data: dict[str, str] | None = None, seed: int = 0) -> str:
    r = httpx.post(
        f"{url}/api/v1/generations",
        files={"image": ("disk.png", disk_png(), "image/png")},
        data={**FAST, "seed": str(seed), **(data or {})},
        timeout=30,
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def job(url: str, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/generations/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_finished(url: str, job_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    return wait_for(
        f"job {job_id} to finish",
        lambda: (j := job(url, job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        timeout_s,
        0.3,
    )


# ------------------------------------------------------------------ the tests


def test_kill_9_telemetry_generations_keep_succeeding_and_it_comes_back(launch) -> None:
    # A long first back-off holds telemetry down long enough to watch the stack without it.
    stack = launch("telemetry", SUPERVISOR_BACKOFF_INITIAL_S="12")
    before = stack.wait_up()
    old = stack.kill_part("telemetry")

    status, body = wait_for("/readyz degraded", lambda: (r := stack.readyz())[1].get("status") == "degraded" and r, 15)
    assert status == 200 and body["degraded"] == ["telemetry"] and body["checks"]["telemetry"] == "unavailable"
    done = wait_finished(stack.url, submit(stack.url, seed=1))
    assert done["status"] == "succeeded", done["error"]
    assert "telemetry" not in stack.parts(), "the job should have run while telemetry was down"
    # The others never stopped.
    assert {n: p for n, p in stack.parts().items()} == {n: before[n] for n in ("generation", "gateway")}
    exited = stack.events("part_exited", "telemetry")
    assert len(exited) == 1 and exited[0]["exit"] == "ended by SIGKILL" and exited[0]["pid"] == old

    new = stack.wait_back("telemetry", old)
    status, body = wait_for("/readyz ready again", lambda: (r := stack.readyz())[1].get("status") == "ready" and r, 30)
    assert status == 200 and body["checks"]["telemetry"] == "serving"
    assert stack.parts() == {**before, "telemetry": new}
    done = wait_finished(stack.url, submit(stack.url, seed=2))
    assert done["status"] == "succeeded", done["error"]


def test_kill_9_generation_its_queued_jobs_come_back(launch) -> None:
    # One job a batch, so what waits behind the slow one is queued, not in its batch.
    stack = launch("generation", GENERATION_MAX_BATCH_SIZE="1", GENERATION_BACKEND_PLUGINS="tests.slow_backend")
    before = stack.wait_up()
    with grpc.insecure_channel(f"127.0.0.1:{stack.ports['GENERATION_PORT']}") as channel:
        stub = generation_pb2_grpc.GenerationServiceStub(channel)
        slow = stub.SubmitGeneration(pb.GenerateRequest(image=disk_png(), **ON_THE_DEVICE), timeout=30).id
    wait_for("the slow job to run", lambda: job(stack.url, slow)["status"] == "running", 60)
    queued = [submit(stack.url, seed=i) for i in range(4)]
    # The worker prepares the next batch while the device is busy: that one is "running", the rest wait.
    at_kill = [job(stack.url, i)["status"] for i in (slow, *queued)]
    assert at_kill[0] == "running" and at_kill.count("queued") >= 2, at_kill

    old = stack.kill_part("generation")
    wait_for("/readyz unavailable", lambda: stack.readyz()[0] == 503, 15)
    new = stack.wait_back("generation", old)
    assert stack.parts() == {**before, "generation": new}
    # The gateway reconnects by itself (its channel retries within two seconds).
    wait_for("/readyz ready again", lambda: stack.readyz()[1].get("status") == "ready", 30)
    exited = stack.events("part_exited", "generation")
    assert len(exited) == 1 and exited[0]["exit"] == "ended by SIGKILL" and exited[0]["restart_in_s"] == 0.5

    # Nothing accepted was lost: the queued jobs and the interrupted one run after the restart.
    for job_id in (slow, *queued):
        done = wait_finished(stack.url, job_id)
        assert done["status"] == "succeeded", done["error"]


def test_kill_9_gateway_it_is_back_and_serving_then_sigint_stops_in_order(launch) -> None:
    stack = launch("gateway")
    before = stack.wait_up()
    old = stack.kill_part("gateway")
    new = stack.wait_back("gateway", old)
    assert stack.parts() == {**before, "gateway": new}
    # Same port, bound again at once.
    wait_for("/readyz ready through the new gateway", lambda: stack.readyz()[1].get("status") == "ready", 15)
    done = wait_finished(stack.url, submit(stack.url, seed=3))
    assert done["status"] == "succeeded", done["error"]

    # Ctrl-C: the gateway first, then generation, then telemetry; nothing is restarted and nothing is left.
    pids = stack.parts()
    assert stack.stop(signal.SIGINT) == 0
    order = [(e["event"], e["part"]) for e in stack.log() if e.get("event") in ("part_stopping", "part_stopped")]
    assert order == [(event, part) for part in ("gateway", "generation", "telemetry")
                     for event in ("part_stopping", "part_stopped")]
    assert len(stack.events("part_exited")) == 1  # the kill above only
    assert not [pid for pid in pids.values() if alive(pid)]


def test_a_part_that_crashes_in_a_loop_is_given_up_on_alone(launch) -> None:
    # A setting telemetry cannot read: it exits at every start.
    stack = launch(
        "crash-loop", TELEMETRY_WINDOW_S="a quarter of an hour",
        SUPERVISOR_BACKOFF_INITIAL_S="0.1", SUPERVISOR_MAX_RESTARTS="2",
    )
    wait_for("the launcher to give up on telemetry", lambda: stack.events("part_given_up"), 120)
    given_up = stack.events("part_given_up")
    assert [e["part"] for e in given_up] == ["telemetry"] and given_up[0]["exits_in_window"] == 3
    assert "crashing in a loop" in given_up[0]["msg"] and "giving up on it" in given_up[0]["msg"]
    assert [e["restart_in_s"] for e in stack.events("part_exited", "telemetry")] == [0.1, 0.2]
    assert all(e["exit"] == "exit code 1" for e in stack.events("part_exited", "telemetry"))

    # The rest serve; the banner names what is not running.
    wait_for("the banner", lambda: stack._alive_and("NOT running (crashed in a loop, or a setting it cannot start with): telemetry"), 120)
    status, body = wait_for("/readyz degraded", lambda: (r := stack.readyz())[1].get("status") == "degraded" and r, 60)
    assert status == 200 and body["degraded"] == ["telemetry"]
    done = wait_finished(stack.url, submit(stack.url, seed=4))
    assert done["status"] == "succeeded", done["error"]
    assert set(stack.parts()) == {"generation", "gateway"}
    assert len(stack.events("part_started", "telemetry")) == 3, "a part given up on stays down"
    assert stack.events("part_exited", "generation") == stack.events("part_exited", "gateway") == []


def test_a_part_with_a_setting_it_cannot_start_with_is_not_restarted(launch) -> None:
    # No such device here: the generation service says so and exits 2; restarting cannot help.
    stack = launch("bad-setting", GENERATION_DEVICES="cuda:7", SUPERVISOR_BACKOFF_INITIAL_S="0.1")
    given_up = wait_for("the launcher to give up on generation", lambda: stack.events("part_given_up"), 120)
    assert [e["part"] for e in given_up] == ["generation"] and given_up[0]["exit"] == "exit code 2"
    assert "configuration" in given_up[0]["msg"]
    time.sleep(1.0)
    assert len(stack.events("part_started", "generation")) == 1
    status, body = wait_for("/readyz", lambda: (r := stack.readyz())[0] == 503 and r, 60)
    assert body["status"] == "unavailable"


def test_a_second_signal_kills_what_is_left_at_once(launch) -> None:
    stack = launch("second-signal")
    pids = stack.wait_up()
    slow = submit(stack.url, SLOW)
    wait_for("the slow job to run", lambda: job(stack.url, slow)["status"] == "running", 60)
    assert stack.proc is not None
    stack.proc.send_signal(signal.SIGTERM)
    # Generation drains its running batch for up to its grace period (20 s)...
    wait_for("generation draining", lambda: stack.events("part_stopping", "generation"), 30, 0.05)
    t0 = time.monotonic()
    stack.proc.send_signal(signal.SIGTERM)
    # ...unless asked again.
    assert stack.proc.wait(15) == 0 and time.monotonic() - t0 < 10
    assert stack.log("generation asked to stop at once; killing it")
    assert not [pid for pid in pids.values() if alive(pid)]


def test_a_killed_launcher_leaves_no_part_behind(launch) -> None:
    stack = launch("orphans")
    pids = stack.wait_up()
    stack.stop(signal.SIGKILL)
    wait_for("the parts to stop", lambda: not [p for p in pids.values() if alive(p)], 60)


# ------------------------------------------------------------ the restart policy


def test_backoff_doubles_to_its_ceiling_and_resets_after_a_minute_up() -> None:
    backoff = Backoff(initial_s=0.5, max_s=30.0, reset_after_s=60.0)
    assert [backoff.delay(up_for_s=2.0) for _ in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert backoff.delay(up_for_s=59.0) == 30.0
    assert backoff.delay(up_for_s=60.0) == 0.5
    assert backoff.delay(up_for_s=1.0) == 1.0


def test_crash_window_counts_only_recent_exits() -> None:
    window = CrashWindow(max_restarts=5, window_s=60.0)
    assert not any(window.record(t) for t in (0.0, 10.0, 20.0, 30.0, 40.0))
    assert not window.record(61.0)  # the exit at 0 s has left the window: 5 in it
    assert window.record(62.0)  # the sixth within a minute
