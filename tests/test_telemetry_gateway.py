"""The performance router in a FastAPI app, over httpx's ASGI transport,
against the real telemetry subprocess: paths, field names, the CPU device,
and the error mapping."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from gateway.performance_routes import make_telemetry_stub, router
from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.generation.device_monitor import sample_devices
from services.generation.telemetry_client import sample_to_proto
from tests.telemetry_fixtures import (  # noqa: F401
    MIB,
    five_stages,
    free_port,
    profile,
    stub,
    telemetry,
)


@pytest.fixture(scope="module")
def planted(stub) -> None:  # noqa: F811
    stub.ReportProfile(
        tpb.ReportProfileRequest(profiles=[
            profile("g1", "inflate", five_stages(0.5, 1.0, 4.87, 2.0, 1.63), peaks={"shape_generation": 500 * MIB}),
            profile("g2", "inflate", five_stages(1.0, 2.0, 9.74, 4.0, 3.26)),
            profile("g3", "inflate", five_stages(1.0, 2.0, 9.74, 4.0, 3.26), started_at=time.time() - 7200),
        ]),
        timeout=10,
    )
    # Three real samples of this machine, as the generation service would push them.
    samples = []
    for i in range(3):
        (s,) = sample_devices("gen-1")
        msg = sample_to_proto(s)
        msg.sampled_at = s.sampled_at - 20 + 10 * i
        samples.append(msg)
    stub.ReportDeviceSamples(tpb.ReportDeviceSamplesRequest(samples=samples), timeout=10)
    stub.RecommendBatchSize(
        tpb.RecommendBatchSizeRequest(backend="inflate", resolution=256, steps=50, queue_length=3,
                                      memory=tpb.MemorySnapshot(free_bytes=4096 * MIB)),
        timeout=10,
    )


async def _client(address: str) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    app.include_router(router)
    channel, telemetry_stub = make_telemetry_stub(address)
    app.state.telemetry_stub = telemetry_stub
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
            yield client
    finally:
        await channel.close()


@pytest.fixture
async def api(telemetry, planted) -> AsyncIterator[httpx.AsyncClient]:  # noqa: F811
    async for client in _client(telemetry.address):
        yield client


@pytest.fixture
async def dead_api() -> AsyncIterator[httpx.AsyncClient]:
    async for client in _client(f"127.0.0.1:{free_port()}"):
        yield client


async def test_summary_fields(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/performance/summary", params={"backend": "inflate"})
    assert r.status_code == 200
    body = r.json()
    assert body["total_pipelines"] == 3
    for key in ("avg_duration", "min_duration", "max_duration", "p50_duration", "p95_duration"):
        assert isinstance(body[key], float)
    assert body["min_duration"] == pytest.approx(10.0) and body["max_duration"] == pytest.approx(20.0)
    assert list(body["stage_breakdown"]) == [
        "image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export",
    ]
    shape = body["stage_breakdown"]["shape_generation"]
    assert set(shape) >= {"avg_duration", "p50", "p95", "max", "share"}
    assert shape["share"] == pytest.approx(0.487)
    assert body["bottlenecks"][0] == {"stage": "shape_generation", "share": pytest.approx(0.487),
                                      "severity": "critical"}

    recent = (await api.get("/api/performance/summary", params={"backend": "inflate", "window": "recent"})).json()
    assert recent["total_pipelines"] == 2 and recent["window"] == "recent"


async def test_recommendations_fields(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/performance/recommendations")
    assert r.status_code == 200
    recs = r.json()["recommendations"]
    first = recs[0]
    assert set(first) >= {"code", "severity", "message", "figures"}
    assert first["message"] == "shape_generation takes 48.7% of the pipeline — optimize it first"
    assert first["severity"] == "critical"
    assert first["figures"]["share"] == pytest.approx(0.487)


async def test_gpu_status_reports_this_cpu(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/gpu/status")
    assert r.status_code == 200
    body = r.json()
    (device,) = body["devices"]
    assert (device["worker_id"], device["device"], device["device_type"]) == ("gen-1", "cpu", "cpu")
    assert set(body["memory"]) == {"total_mb", "used_mb", "free_mb", "utilization_percent"}
    assert body["memory"]["total_mb"] > 0
    assert body["memory"]["total_mb"] == pytest.approx(device["memory"]["total_mb"])
    trends = body["trends"]
    assert trends["trend"] in {"rising", "stable", "falling"}
    assert set(trends) >= {"avg_utilization", "avg_utilization_1m", "avg_utilization_5m", "avg_utilization_15m"}
    assert 0.0 <= trends["avg_utilization"] <= 100.0
    assert isinstance(body["recommendations"], list)


async def test_optimizer_state_shows_decisions_with_reasoning(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/optimizer/state", params={"backend": "inflate"})
    assert r.status_code == 200
    body = r.json()
    (cost,) = body["costs"]
    assert (cost["backend"], cost["resolution"], cost["steps"], cost["basis"]) == ("inflate", 256, 50, "measured")
    assert cost["per_item_mb"] == pytest.approx(575.0)  # 500 MiB + 15%
    (decision,) = body["decisions"]
    assert decision["size"] == 3
    assert decision["reasoning"] == (
        "available 4096 MB, 575 MB per item at 256² (measured, 1 peak), target 85% → 6; queue length 3 → 3"
    )
    assert body["target_utilization"] == pytest.approx(0.85)


async def test_bad_queries_answer_400(api: httpx.AsyncClient) -> None:
    r = await api.get("/api/performance/summary", params={"window": "forever"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert r.json()["error"]["message"].startswith("window:")
    # Checked by telemetry itself, passed through.
    r = await api.get("/api/performance/summary", params={"backend": "no spaces"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("backend:")
    r = await api.get("/api/optimizer/state", params={"limit": "5000"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("limit:")


@pytest.mark.parametrize(
    "path",
    ["/api/performance/summary", "/api/performance/recommendations", "/api/gpu/status", "/api/optimizer/state"],
)
async def test_telemetry_down_answers_503(dead_api: httpx.AsyncClient, path: str) -> None:
    r = await dead_api.get(path)
    assert r.status_code == 503
    error = r.json()["error"]
    assert error["code"] == "UNAVAILABLE"
    assert error["message"].startswith("telemetry service unavailable: ")


async def test_no_stub_configured_answers_503() -> None:
    app = FastAPI()
    app.include_router(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as client:
        r = await client.get("/api/gpu/status")
    assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
