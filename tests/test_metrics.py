"""Prometheus metrics: the recording functions, the gRPC interceptor, the
gateway's middleware, the deployment files, and every service of the real
stack exposing its metrics after a few generations.
"""
from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import install_metrics, subscriber
from services.common import metrics
from services.common.errors import InvalidArgument, ResourceExhausted
from services.common.grpc_server import create_server
from services.stack import Stack
from tests.images import photo_png

ROOT = Path(__file__).resolve().parent.parent
FAST = {"resolution": "64", "face_count": "1000", "texture_size": "256"}

# What each process must expose once it has served a few generations.
GATEWAY_NAMES = {
    "orfeas_http_requests_total",
    "orfeas_http_request_duration_seconds",
    "orfeas_event_subscribers",
    "orfeas_request_failures_total",
}
GENERATION_NAMES = {
    "orfeas_requests_total",
    "orfeas_request_failures_total",
    "orfeas_request_duration_seconds",
    "orfeas_queue_length",
    "orfeas_queue_duration_seconds",
    "orfeas_stage_duration_seconds",
    "orfeas_compute_duration_seconds",
    "orfeas_batch_size",
    "orfeas_optimizer_decisions_total",
    "orfeas_device_memory_used_bytes",
    "orfeas_device_memory_total_bytes",
    "orfeas_device_utilization_ratio",
    "orfeas_telemetry_reports_dropped_total",
    "orfeas_jobs_total",
    "orfeas_job_duration_seconds",
}
TELEMETRY_NAMES = {"orfeas_requests_total", "orfeas_request_failures_total", "orfeas_request_duration_seconds"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a text exposition."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for (sample, sample_labels), v in samples(text).items():
        if sample == name and set(labels.items()) <= set(sample_labels):
            total += v
    return total


def local_text() -> str:
    body, _ = metrics.exposition()
    return body.decode()


# ------------------------------------------------------------- recording functions
def test_recording_functions_reach_the_exposition() -> None:
    before = local_text()
    metrics.record_stage("mesh_export", 0.2, "cuda:3")
    metrics.record_queue_wait(0.05)
    metrics.set_queue_length(3)
    metrics.record_batch(4, 0.5, peak_bytes=123, device="cpu")
    metrics.record_batch(2, 0.25, peak_bytes=0, device="cuda:3")
    metrics.record_batch_decision("local-fallback", 4, "cuda:3")
    metrics.record_out_of_memory(8, "cpu")
    metrics.record_job_finished("failed", "RESOURCE_EXHAUSTED", 2.0)
    metrics.record_job_finished("cancelled", None, 1.0)
    metrics.record_telemetry_dropped(2)
    after = local_text()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("orfeas_stage_duration_seconds_count", stage="mesh_export", device="cuda:3") == 1
    assert grew("orfeas_stage_duration_seconds_count", stage="mesh_export", device="cpu") == 0
    assert grew("orfeas_queue_duration_seconds_count") == 1
    assert value(after, "orfeas_queue_length") == 3
    # Batch sizes and compute time per device: each device's series holds its own batches only.
    assert grew("orfeas_batch_size_sum", device="cpu") == 4
    assert grew("orfeas_batch_size_sum", device="cuda:3") == 2
    assert grew("orfeas_compute_duration_seconds_count", device="cpu") == 1
    assert grew("orfeas_compute_duration_seconds_count", device="cuda:3") == 1
    assert value(after, "orfeas_batch_memory_peak_bytes", device="cpu") == 123
    assert value(after, "orfeas_optimizer_batch_size", device="cuda:3") == 4
    assert grew("orfeas_optimizer_decisions_total", source="local-fallback") == 1
    assert grew("orfeas_batch_out_of_memory_total", device="cpu") == 1
    assert grew("orfeas_jobs_total", status="failed") == 1
    assert grew("orfeas_job_failures_total", reason="overloaded") == 1
    assert grew("orfeas_job_failures_total", reason="cancelled") == 1
    assert grew("orfeas_telemetry_reports_dropped_total") == 2
    # Known label values exist before their first event, so rate() sees them: image_loading at
    # admission (no device yet), and every stage of every device a service declares.
    assert ("orfeas_stage_duration_seconds_count", (("device", ""), ("stage", "image_loading"))) in samples(after)
    metrics.declare_devices(["cuda:5"])
    declared = samples(local_text())
    for stage in metrics.STAGES:
        assert ("orfeas_stage_duration_seconds_count", (("device", "cuda:5"), ("stage", stage))) in declared
    assert ("orfeas_batch_size_count", (("device", "cuda:5"),)) in declared


def test_scrape_time_sources_are_read_at_each_scrape() -> None:
    class Sample:
        device = "cuda:7"
        memory_used_bytes = 3 * 2**30
        memory_total_bytes = 80 * 2**30
        utilization_percent: float | None = 42.0

    dropped = {"n": 0}
    metrics.track_devices(lambda: [Sample()])
    metrics.track_telemetry_dropped(lambda: dropped["n"])
    first = value(local_text(), "orfeas_telemetry_reports_dropped_total")
    dropped["n"] = 5
    Sample.memory_used_bytes = 4 * 2**30
    text = local_text()
    assert value(text, "orfeas_telemetry_reports_dropped_total") == first + 5
    assert value(text, "orfeas_device_memory_used_bytes", device="cuda:7") == 4 * 2**30
    assert value(text, "orfeas_device_memory_total_bytes", device="cuda:7") == 80 * 2**30
    assert value(text, "orfeas_device_utilization_ratio", device="cuda:7") == pytest.approx(0.42)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
        (grpc.StatusCode.NOT_FOUND, "not_found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded"),
        (grpc.StatusCode.CANCELLED, "cancelled"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
        (grpc.StatusCode.INTERNAL, "internal"),
        (grpc.StatusCode.DATA_LOSS, "internal"),
        ("INTERRUPTED", "internal"),
    ],
)
def test_failure_reasons(code: grpc.StatusCode | str, reason: str) -> None:
    assert metrics.failure_reason(code) == reason


# ------------------------------------------------------------------ interceptor
async def _ok(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _invalid(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise InvalidArgument("seed", "must be a number")


async def _aborted(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such job")
    return b""


async def _stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield b"one"
    yield b"two"
    raise ResourceExhausted("queue full", retry_after_s=2)


async def test_interceptor_counts_calls_by_method_and_outcome() -> None:
    server, _health = create_server([], interceptors=[metrics.MetricsInterceptor("unit")])
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Unit",
                {
                    "Ok": grpc.unary_unary_rpc_method_handler(_ok),
                    "Invalid": grpc.unary_unary_rpc_method_handler(_invalid),
                    "Aborted": grpc.unary_unary_rpc_method_handler(_aborted),
                    "Stream": grpc.unary_stream_rpc_method_handler(_stream),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    before = local_text()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await channel.unary_unary("/test.Unit/Ok")(b"x", timeout=10) == b"x"
            assert await channel.unary_unary("/test.Unit/Ok")(b"y", timeout=10) == b"y"
            with pytest.raises(grpc.aio.AioRpcError) as invalid:
                await channel.unary_unary("/test.Unit/Invalid")(b"", timeout=10)
            assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as aborted:
                await channel.unary_unary("/test.Unit/Aborted")(b"", timeout=10)
            assert aborted.value.code() == grpc.StatusCode.NOT_FOUND
            received = []
            with pytest.raises(grpc.aio.AioRpcError) as exhausted:
                async for item in channel.unary_stream("/test.Unit/Stream")(b"", timeout=10):
                    received.append(item)
            assert received == [b"one", b"two"]
            assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await server.stop(None)
    after = local_text()

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("orfeas_requests_total", service="unit", method="Ok", outcome="ok") == 2
    assert grew("orfeas_requests_total", service="unit", method="Invalid", outcome="invalid_argument") == 1
    assert grew("orfeas_requests_total", service="unit", method="Aborted", outcome="not_found") == 1
    assert grew("orfeas_requests_total", service="unit", method="Stream", outcome="resource_exhausted") == 1
    assert grew("orfeas_request_failures_total", service="unit", reason="invalid") == 1
    assert grew("orfeas_request_failures_total", service="unit", reason="not_found") == 1
    assert grew("orfeas_request_failures_total", service="unit", reason="overloaded") == 1
    assert grew("orfeas_request_duration_seconds_count", service="unit", method="Ok") == 2
    # Health checks are probes, not traffic.
    assert grew("orfeas_requests_total", service="unit", method="Check") == 0


# --------------------------------------------------------------------- gateway
def _gateway_app() -> FastAPI:
    app = FastAPI()

    @app.get("/api/v1/things/{thing_id}")
    async def thing(thing_id: str) -> dict[str, str]:
        return {"id": thing_id}

    @app.get("/api/v1/stream")
    async def stream() -> dict[str, int]:
        with subscriber("sse"):
            return {"subscribers": int(value(local_text(), "orfeas_event_subscribers", transport="sse"))}

    install_metrics(app)
    return app


async def test_gateway_middleware_counts_by_route_template_and_serves_metrics() -> None:
    before = local_text()
    transport = httpx.ASGITransport(app=_gateway_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        for thing_id in ("a", "b", "c"):
            assert (await client.get(f"/api/v1/things/{thing_id}")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404
        assert (await client.post("/api/v1/things/a")).status_code == 405
        inside = (await client.get("/api/v1/stream")).json()["subscribers"]
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    route = "/api/v1/things/{thing_id}"
    assert grew("orfeas_http_requests_total", route=route, method="GET", status="200") == 3
    assert grew("orfeas_http_requests_total", route="unmatched", status="404") == 1
    assert grew("orfeas_http_requests_total", route=route, method="POST", status="405") == 1
    assert grew("orfeas_http_request_duration_seconds_count", route=route, method="GET") == 3
    assert grew("orfeas_request_failures_total", service="gateway", reason="not_found") == 1
    # No label carries a concrete id, and the scraper's polls are not counted.
    assert 'route="/api/v1/things/a"' not in after
    assert 'route="/metrics"' not in after
    assert inside >= 1
    assert value(after, "orfeas_event_subscribers", transport="sse") == value(before, "orfeas_event_subscribers", transport="sse")


# ------------------------------------------------------------- deployment files
def _defined_names() -> set[str]:
    """Every sample name the project's metrics can expose."""
    names: set[str] = set()
    for family in text_string_to_metric_families(local_text()):
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def test_dashboard_is_grafana_json_and_queries_only_defined_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/orfeas-dashboard.json").read_text())
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    titles = " | ".join(p["title"].lower() for p in dashboard["panels"])
    for wanted in ("stage", "throughput", "p50", "p95", "p99", "queue", "batch size", "memory", "utilisation", "errors by reason"):
        assert wanted in titles, wanted
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    defined = _defined_names()
    for panel in dashboard["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for name in re.findall(r"\borfeas_[a-z_]+", target["expr"]):
                assert name in defined, f"{panel['title']}: {name} is not a defined metric"


def test_prometheus_config_scrapes_all_three_services_on_loopback() -> None:
    text = (ROOT / "deploy/prometheus.yml").read_text()
    targets = re.findall(r'"(\d+\.\d+\.\d+\.\d+:\d+)"', text)
    assert sorted(targets) == ["127.0.0.1:5000", "127.0.0.1:9101", "127.0.0.1:9102"]


# ------------------------------------------------------------------ real stack
def _generate_a_few(http: httpx.Client, n: int = 3) -> list[str]:
    ids = []
    for seed in range(n):
        response = http.post(
            "/api/v1/generations",
            files={"image": ("astronaut.png", photo_png("astronaut", 128), "image/png")},
            data={**FAST, "seed": str(seed)},
        )
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    for job_id in ids:
        with http.stream("GET", f"/api/v1/generations/{job_id}/events", timeout=120) as events:
            for _ in events.iter_lines():
                pass
        assert http.get(f"/api/v1/generations/{job_id}").json()["status"] == "succeeded"
    return ids


def _scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, url
    return response.text


def test_every_service_exposes_its_metrics_after_a_few_generations(stack: Stack, http: httpx.Client) -> None:
    _generate_a_few(http)
    # The device sampler runs every second in the test stack; one more scrape
    # later never hurts, and the assertions below do not depend on time.
    gateway = _scrape(f"{stack.gateway_url}/metrics")
    generation = _scrape(f"http://127.0.0.1:{stack.generation_metrics_port}/metrics")
    telemetry = _scrape(f"http://127.0.0.1:{stack.telemetry_metrics_port}/metrics")

    for text, wanted, where in (
        (gateway, GATEWAY_NAMES, "gateway"),
        (generation, GENERATION_NAMES, "generation"),
        (telemetry, TELEMETRY_NAMES, "telemetry"),
    ):
        exposed = {name for (name, _labels) in samples(text)}
        for family in text_string_to_metric_families(text):
            # A counter's family drops `_total`; one without samples yet is still exposed.
            exposed.add(family.name + ("_total" if family.type == "counter" else ""))
        missing = {n for n in wanted if not any(e == n or e.startswith(n + "_") for e in exposed)}
        assert not missing, f"{where} lacks {sorted(missing)}"

    assert value(gateway, "orfeas_http_requests_total", route="/api/v1/generations", method="POST", status="202") >= 3
    for stage in metrics.STAGES:
        assert value(generation, "orfeas_stage_duration_seconds_count", stage=stage) >= 3, stage
    assert value(generation, "orfeas_jobs_total", status="succeeded") >= 3
    assert value(generation, "orfeas_batch_size_count") >= 1
    assert value(generation, "orfeas_requests_total", method="SubmitGeneration", outcome="ok") >= 3
    assert value(generation, "orfeas_device_memory_total_bytes") > 0
