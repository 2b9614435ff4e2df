"""/healthz and /readyz: the probes an orchestrator (or `make run`'s supervisor) polls."""
from __future__ import annotations

import asyncio

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.backends_routes import backend_readiness
from gateway.errors import ContractRoute
from gateway.models.health import Health, Readiness, ReadinessChecks
from pb.orfeas.generation.v1 import generation_pb2 as pb

router = APIRouter(tags=["health"], route_class=ContractRoute)

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
TELEMETRY_SERVICE = "orfeas.telemetry.v1.TelemetryService"  # not imported: the gateway needs only its name
CHECK_DEADLINE_S = 1.0


@router.get("/healthz", operation_id="healthz", summary="The gateway process is alive", response_model=Health,
            response_description="Alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    summary="Ready when the generation service passes its health check",
    response_model=Readiness,
    response_description="Ready, or degraded (serving without what `degraded` lists)",
    responses={503: {"model": Readiness, "description": "The generation service does not answer"}},
)
async def readyz(request: Request) -> Readiness | JSONResponse:
    generation_ok, telemetry_ok = await asyncio.gather(
        _healthy(request.app.state.generation_health, GENERATION_SERVICE),
        _healthy(request.app.state.telemetry_health, TELEMETRY_SERVICE),
    )
    checks = ReadinessChecks(
        generation="serving" if generation_ok else "unavailable",
        telemetry="serving" if telemetry_ok else "unavailable",
        storage=None,
    )
    if not generation_ok:
        down = Readiness(status="unavailable", checks=checks, degraded=[], backends=None)
        return JSONResponse(down.model_dump(mode="json"), status_code=503)
    # Each shape backend's state; one that is not ready (inflate always is) says why.
    backends, status = await asyncio.gather(backend_readiness(request), _service_status(request))
    degraded: list[str] = []
    if status is not None and status.HasField("storage"):
        checks.storage = "ok" if status.storage.ok else status.storage.message
        if not status.storage.ok:
            degraded.append("storage")
    if not telemetry_ok:
        degraded.append("telemetry")
    return Readiness(
        status="degraded" if degraded else "ready", checks=checks, degraded=degraded, backends=backends
    )


async def _service_status(request: Request) -> pb.ServiceStatus | None:
    try:
        return await request.app.state.generation.GetServiceStatus(
            pb.GetServiceStatusRequest(), timeout=CHECK_DEADLINE_S
        )
    except grpc.aio.AioRpcError:
        return None


async def _healthy(stub: health_pb2_grpc.HealthStub, service: str) -> bool:
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=CHECK_DEADLINE_S)
    except grpc.aio.AioRpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING
