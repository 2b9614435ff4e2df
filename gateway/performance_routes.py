"""REST views of the telemetry service. The paths and field names are the ones
operators already script against; do not rename them.

    GET /api/performance/summary?backend=&window=all|recent&worker_id=
    GET /api/performance/recommendations?backend=
    GET /api/gpu/status?worker_id=
    GET /api/optimizer/state?backend=&limit=

The summary covers every worker together and breaks the same profiles down
per worker (`workers`); /api/gpu/status lists every device of every worker.

Durations are seconds, shares fractions from 0 to 1, memory MB (MiB).

The gateway app owns the channel: it sets `app.state.telemetry_stub` (see
`make_telemetry_stub`) and includes `router`. When telemetry is down these
answer 503 {"error": {"code": "UNAVAILABLE", "message": "telemetry service
unavailable: ..."}}; a bad query answers 400 with code INVALID_ARGUMENT.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import grpc
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from gateway import parameters as p
from gateway.errors import ContractRoute, error_responses
from gateway.models.performance import DeviceStatus, OptimizerState, PerformanceSummary, Recommendations
from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common.config import SecurityConfig
from services.common.grpc_security import create_channel

MIB = 1024 * 1024
CALL_DEADLINE_S = 1.0
# Reconnect quickly once telemetry is back (gRPC's own back-off grows to 2 minutes).
# The connect timeout (grpc.min_reconnect_backoff_ms, 20 s) stays: a busy server
# may take a while to answer a new connection.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]

_SEVERITY = {tpb.SEVERITY_INFO: "info", tpb.SEVERITY_WARNING: "warning", tpb.SEVERITY_CRITICAL: "critical"}
_TREND = {
    tpb.MEMORY_TREND_UNKNOWN: "unknown",
    tpb.MEMORY_TREND_STABLE: "stable",
    tpb.MEMORY_TREND_RISING: "rising",
    tpb.MEMORY_TREND_FALLING: "falling",
}
_WINDOWS = {"all": tpb.WINDOW_ALL, "recent": tpb.WINDOW_RECENT}

router = APIRouter(tags=["performance"], route_class=ContractRoute)
# The telemetry service is down or slow (503), or answered with another error (502).
REPORT_ERRORS = error_responses(400, 401, 502, 503)

# Query parameters, with the ranges the telemetry service checks (telemetry.proto).
BackendQuery = Annotated[
    str, Query(pattern=p.TELEMETRY_BACKEND_PATTERN, description="One backend; empty: all of them")
]
WorkerQuery = Annotated[str, Query(max_length=p.WORKER_ID_MAX_LENGTH, description="One worker; empty: all of them")]

Reply = TypeVar("Reply")


def make_telemetry_stub(
    address: str, security: SecurityConfig | None = None
) -> tuple[grpc.aio.Channel, telemetry_pb2_grpc.TelemetryServiceStub]:
    """A channel and stub for the app to keep on app.state (call from its event
    loop; close the channel on shutdown). With the service token and TLS when
    `security` (default: ORFEAS_* from the environment) asks for them."""
    security = security or SecurityConfig.from_env()
    if security.service_token or security.tls_ca:
        channel = create_channel(address, security)
    else:
        channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    return channel, telemetry_pb2_grpc.TelemetryServiceStub(channel)


def telemetry_stub(request: Request) -> telemetry_pb2_grpc.TelemetryServiceStub | None:
    return getattr(request.app.state, "telemetry_stub", None)


Stub = telemetry_pb2_grpc.TelemetryServiceStub | None


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"code": code, "message": message}})


async def _call(
    stub: Stub, method: Callable[[telemetry_pb2_grpc.TelemetryServiceStub], Callable[..., Awaitable[Reply]]], msg: Any
) -> Reply | JSONResponse:
    if stub is None:
        return _error(503, "UNAVAILABLE", "telemetry service unavailable: no telemetry connection configured")
    try:
        return await method(stub)(msg, timeout=CALL_DEADLINE_S)
    except grpc.aio.AioRpcError as exc:
        code = exc.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return _error(503, "UNAVAILABLE", f"telemetry service unavailable: {code.name}: {exc.details()}")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return _error(400, "INVALID_ARGUMENT", exc.details() or "invalid argument")
        return _error(502, code.name, f"telemetry service error: {exc.details()}")


def _opt(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def _mb(n: int | float) -> float:
    return round(n / MIB, 1)


def _recommendation(r: tpb.Recommendation) -> dict[str, Any]:
    return {
        "code": r.code,
        "severity": _SEVERITY.get(r.severity, "info"),
        "message": r.message,
        "figures": dict(sorted(r.figures.items())),
        "subject": r.subject,
    }


def _trends(t: tpb.Trends) -> dict[str, Any]:
    return {
        "trend": _TREND.get(t.trend, "unknown"),
        "avg_utilization": _opt(t, "avg_utilization"),
        "avg_utilization_1m": _opt(t, "avg_utilization_1m"),
        "avg_utilization_5m": _opt(t, "avg_utilization_5m"),
        "avg_utilization_15m": _opt(t, "avg_utilization_15m"),
        "memory_slope_mb_per_min": round(t.memory_slope_bytes_per_s * 60 / MIB, 3),
        "samples": t.samples,
    }


def _memory(total: int, used: int, free: int) -> dict[str, Any]:
    return {
        "total_mb": _mb(total),
        "used_mb": _mb(used),
        "free_mb": _mb(free),
        "utilization_percent": round(100.0 * used / total, 1) if total else 0.0,
    }


def _device(st: tpb.DeviceState) -> dict[str, Any]:
    s = st.latest
    torch_fields = {
        "free_mb": _opt(s, "torch_free_bytes"),
        "total_mb": _opt(s, "torch_total_bytes"),
        "max_allocated_mb": _opt(s, "torch_max_allocated_bytes"),
    }
    return {
        "worker_id": s.worker_id,
        "device": s.device,
        "device_type": s.device_type,
        "name": s.name,
        "memory": _memory(s.memory_total_bytes, s.memory_used_bytes, s.memory_free_bytes),
        "utilization_percent": _opt(s, "utilization_percent"),
        "temperature_c": _opt(s, "temperature_c"),
        "power_w": _opt(s, "power_w"),
        "torch": {k: _mb(v) for k, v in torch_fields.items() if v is not None} or None,
        "sampled_at": s.sampled_at,
        "age_s": round(st.age_s, 3),
        "stale": st.stale,
        "trends": _trends(st.trends),
    }


@router.get(
    "/api/performance/summary",
    operation_id="performance_summary",
    summary="Pipeline durations, per-stage breakdown and bottlenecks",
    response_model=PerformanceSummary,
    response_description="The summary",
    responses=REPORT_ERRORS,
)
async def performance_summary(
    backend: BackendQuery = "",
    window: Annotated[Literal["all", "recent"], Query(description="recent: the last TELEMETRY_WINDOW_S")] = "all",
    worker_id: WorkerQuery = "",
    stub: Stub = Depends(telemetry_stub),
) -> Any:
    reply = await _call(
        stub,
        lambda s: s.GetPerformanceSummary,
        tpb.GetPerformanceSummaryRequest(backend=backend, window=_WINDOWS[window], worker_id=worker_id),
    )
    if isinstance(reply, JSONResponse):
        return reply
    return {
        "backend": reply.backend,
        "window": window,
        "window_seconds": reply.window_seconds,
        "total_pipelines": reply.total_pipelines,
        "succeeded_pipelines": reply.succeeded_pipelines,
        "failed_pipelines": reply.failed_pipelines,
        "avg_duration": reply.avg_duration,
        "min_duration": reply.min_duration,
        "max_duration": reply.max_duration,
        "p50_duration": reply.p50_duration,
        "p95_duration": reply.p95_duration,
        "stage_breakdown": {
            st.name: {
                "avg_duration": st.avg_duration,
                "p50": st.p50,
                "p95": st.p95,
                "max": st.max,
                "share": st.share,
                "count": st.count,
            }
            for st in reply.stage_breakdown
        },
        "bottlenecks": [
            {"stage": b.stage, "share": b.share, "severity": _SEVERITY.get(b.severity, "warning")}
            for b in reply.bottlenecks
        ],
        "backends": list(reply.backends),
        "worker_id": reply.worker_id,
        "workers": [
            {
                "worker_id": w.worker_id,
                "device": w.device,
                "total_pipelines": w.total_pipelines,
                "succeeded_pipelines": w.succeeded_pipelines,
                "failed_pipelines": w.failed_pipelines,
                "avg_duration": w.avg_duration,
                "p50_duration": w.p50_duration,
                "p95_duration": w.p95_duration,
                "avg_batch_size": w.avg_batch_size,
                "share": w.share,
            }
            for w in reply.workers
        ],
    }


@router.get(
    "/api/performance/recommendations",
    operation_id="performance_recommendations",
    summary="What to change, most severe first",
    response_model=Recommendations,
    response_description="The recommendations",
    responses=REPORT_ERRORS,
)
async def performance_recommendations(backend: BackendQuery = "", stub: Stub = Depends(telemetry_stub)) -> Any:
    reply = await _call(stub, lambda s: s.GetRecommendations, tpb.GetRecommendationsRequest(backend=backend))
    if isinstance(reply, JSONResponse):
        return reply
    return {"recommendations": [_recommendation(r) for r in reply.recommendations]}


@router.get(
    "/api/gpu/status",
    operation_id="gpu_status",
    summary="Every device of every worker: memory, utilisation, trends",
    response_model=DeviceStatus,
    response_description="The devices",
    responses=REPORT_ERRORS,
)
async def gpu_status(worker_id: WorkerQuery = "", stub: Stub = Depends(telemetry_stub)) -> Any:
    reply = await _call(stub, lambda s: s.GetDeviceStatus, tpb.GetDeviceStatusRequest(worker_id=worker_id))
    if isinstance(reply, JSONResponse):
        return reply
    m = reply.memory
    memory = _memory(m.total_bytes, m.used_bytes, m.free_bytes)
    return {
        "devices": [_device(st) for st in reply.devices],
        "memory": memory,
        "trends": _trends(reply.trends),
        "recommendations": [_recommendation(r) for r in reply.recommendations],
    }


@router.get(
    "/api/optimizer/state",
    operation_id="optimizer_state",
    summary="The batch-size optimizer: memory costs per setting and its recent decisions",
    response_model=OptimizerState,
    response_description="The optimizer's state",
    responses=REPORT_ERRORS,
)
async def optimizer_state(
    backend: BackendQuery = "",
    limit: Annotated[
        int, Query(ge=p.DECISIONS_LIMIT.minimum, le=p.DECISIONS_LIMIT.maximum, description="Newest decisions to list")
    ] = int(p.DECISIONS_LIMIT.default or 0),
    stub: Stub = Depends(telemetry_stub),
) -> Any:
    reply = await _call(
        stub, lambda s: s.GetOptimizerState, tpb.GetOptimizerStateRequest(backend=backend, decisions_limit=limit)
    )
    if isinstance(reply, JSONResponse):
        return reply
    return {
        "target_utilization": reply.target_utilization,
        "headroom": reply.headroom,
        "costs": [
            {
                "backend": c.backend,
                "resolution": c.resolution,
                "steps": c.steps,
                "per_item_mb": _mb(c.per_item_bytes),
                "per_item_bytes": c.per_item_bytes,
                "basis": c.basis,
                "observations": c.observations,
                "last_per_item_mb": _mb(c.last_per_item_bytes),
                "max_per_item_mb": _mb(c.max_per_item_bytes),
                "oom_floor_mb": _mb(c.oom_floor_bytes),
                "updated_at": c.updated_at,
            }
            for c in reply.costs
        ],
        "decisions": [
            {
                "id": d.id,
                "decided_at": d.decided_at,
                "worker_id": d.worker_id,
                "device": d.device,
                "backend": d.backend,
                "resolution": d.resolution,
                "steps": d.steps,
                "queue_length": d.queue_length,
                "image_width": d.image_width,
                "image_height": d.image_height,
                "available_mb": _mb(d.available_bytes),
                "per_item_mb": _mb(d.per_item_bytes),
                "basis": d.basis,
                "size": d.size,
                "reasoning": d.reasoning,
                "outcome": (
                    {
                        "ran_size": _opt(d, "ran_size"),
                        "peak_memory_mb": _mb(d.peak_memory_bytes) if d.HasField("peak_memory_bytes") else None,
                        "out_of_memory": _opt(d, "out_of_memory"),
                    }
                    if d.HasField("ran_size") or d.HasField("out_of_memory")
                    else None
                ),
            }
            for d in reply.decisions
        ],
        "total_decisions": reply.total_decisions,
    }
