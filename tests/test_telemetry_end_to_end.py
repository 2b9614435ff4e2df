"""Telemetry as the whole stack uses it: profiles from real jobs, the operator
endpoints through the gateway, and generations that go on while telemetry is down."""
from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import new_stack
from tests.images import disk_png
from tests.logs import entries
from tests.sse import read_events

FAST = {"resolution": "96", "face_count": "2000", "texture_size": "256"}
STAGES = {"image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"}


def generate(http: httpx.Client) -> str:
    response = http.post("/api/v1/generations", files={"image": ("d.png", disk_png(), "image/png")}, data=FAST)
    assert response.status_code == 202, response.text
    events = read_events(http, response.json()["links"]["events"])
    assert events[-1][0] == "succeeded", events[-1]
    return response.json()["id"]


def eventually(fn, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


@pytest.fixture(scope="module")
def telemetry_stack(tmp_path_factory):
    stack = new_stack(tmp_path_factory.mktemp("telemetry-e2e"), "telemetry-e2e")
    stack.start_all()
    yield stack
    stack.stop_all()


def test_real_jobs_reach_the_operator_endpoints(telemetry_stack):
    with httpx.Client(base_url=telemetry_stack.gateway_url, timeout=60) as http:
        for _ in range(3):
            generate(http)
        summary = eventually(lambda: (s := http.get("/api/performance/summary").json())["total_pipelines"] >= 3 and s)
        assert summary, "profiles did not reach telemetry"
        assert set(summary["stage_breakdown"]) == STAGES
        assert sum(s["share"] for s in summary["stage_breakdown"].values()) == pytest.approx(1.0, abs=0.01)
        assert summary["min_duration"] <= summary["avg_duration"] <= summary["max_duration"]
        assert "recommendations" in http.get("/api/performance/recommendations").json()
        status = eventually(lambda: (g := http.get("/api/gpu/status").json())["devices"] and g)
        assert status["devices"][0]["device_type"] == "cpu"
        assert status["memory"]["total_mb"] > 0
        state = http.get("/api/optimizer/state").json()
        assert state["decisions"], state
        assert state["decisions"][0]["reasoning"]


def test_generations_go_on_while_telemetry_is_down_and_readyz_says_degraded(telemetry_stack):
    with httpx.Client(base_url=telemetry_stack.gateway_url, timeout=60) as http:
        before = http.get("/api/performance/summary").json()["total_pipelines"]
        telemetry_stack.kill("telemetry")
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["degraded"] == ["telemetry"]
        assert http.get("/api/performance/summary").status_code == 503
        for _ in range(3):
            generate(http)  # the batch size comes from the local fallback; reports wait in the buffer
        decisions = entries(telemetry_stack.log_dir / "generation.log", "batch size decision")
        assert decisions[-1]["source"] == "local-fallback"
        telemetry_stack.start("telemetry")
        # What was buffered while telemetry was away arrives once it is back, on top of what it kept.
        after = eventually(lambda: http.get("/api/performance/summary").json().get("total_pipelines", 0) >= before + 3)
        assert after
        assert http.get("/readyz").json()["status"] == "ready"


def test_reports_that_do_not_fit_the_buffer_while_telemetry_is_down_are_dropped_and_counted(tmp_path):
    stack = new_stack(tmp_path, "telemetry-drops", GENERATION_TELEMETRY_BUFFER_SIZE="2")
    stack.start_all()
    try:
        stack.kill("telemetry")
        with httpx.Client(base_url=stack.gateway_url, timeout=60) as http:
            for _ in range(5):
                generate(http)
        metrics_text = httpx.get(f"http://127.0.0.1:{stack.generation_metrics_port}/metrics").text
        dropped = [
            float(line.split()[-1])
            for line in metrics_text.splitlines()
            if line.startswith("orfeas_telemetry_reports_dropped_total")
        ]
        # Five profiles into a buffer of two: at least three dropped (batch outcomes drop too).
        assert dropped and dropped[0] >= 3, dropped
    finally:
        stack.stop_all()
