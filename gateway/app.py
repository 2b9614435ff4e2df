"""The REST gateway: REST in, gRPC out, progress as Server-Sent Events and WebSocket.

It holds no state of its own: every answer comes from the generation and
telemetry services, so restarting the gateway changes nothing a client sees.

The routes live in one APIRouter module per resource (generations, events,
backends, performance, health, studio); the bodies they read and write are
the models in gateway/models, and the OpenAPI document (gateway/openapi.py,
docs/openapi.json) follows from both.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from grpc_health.v1 import health_pb2_grpc

from gateway import errors, openapi
from gateway.auth import BearerTokenMiddleware
from gateway.backends_routes import router as backends_router
from gateway.events_routes import router as events_router
from gateway.generations_routes import router as generations_router
from gateway.health_routes import router as health_router
from gateway.metrics import install_metrics
from gateway.performance_routes import router as performance_router
from gateway.studio import mount_studio
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from services.common.config import GatewayConfig, SecurityConfig
from services.common.grpc_security import balancing_options, create_channel

GENERATION_SERVICE = "orfeas.generation.v1.GenerationService"
# The calls that only read (or, as Cancel, may be repeated): tried again on another instance when theirs
# went away before answering. Submit and Generate are not, lest a job be queued twice.
RETRIED_GENERATION_METHODS = (
    "GetGeneration", "ListGenerations", "WatchGeneration", "DownloadResult", "DownloadCutout",
    "CancelGeneration", "GetServiceStatus", "ListBackends",
)

TITLE = "ORFEAS 2D→3D"
API_VERSION = "1.0"
DESCRIPTION = (
    "One picture in, a watertight textured mesh out. Every error is `{\"error\": {\"code\", \"message\"}}` with "
    "the message starting with the field at fault; a field that breaks the documented schema is 400 "
    "INVALID_ARGUMENT. With GATEWAY_AUTH_TOKEN set, every /api/ path needs `Authorization: Bearer <token>`."
)


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    config = config or GatewayConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        security = SecurityConfig.from_env()
        # Round robin over every generation instance the address names (see balancing_options).
        generation_channel = create_channel(
            config.generation_address,
            security,
            balancing_options(config.generation_address, GENERATION_SERVICE, RETRIED_GENERATION_METHODS),
        )
        telemetry_channel = create_channel(config.telemetry_address, security)
        app.state.generation = pb_grpc.GenerationServiceStub(generation_channel)
        app.state.generation_health = health_pb2_grpc.HealthStub(generation_channel)
        app.state.telemetry_channel = telemetry_channel
        app.state.telemetry_stub = telemetry_pb2_grpc.TelemetryServiceStub(telemetry_channel)
        app.state.telemetry_health = health_pb2_grpc.HealthStub(telemetry_channel)
        yield
        await generation_channel.close()
        await telemetry_channel.close()

    app = FastAPI(title=TITLE, version=API_VERSION, description=DESCRIPTION, lifespan=lifespan)
    app.state.config = config
    errors.install(app)
    if config.auth_token:
        app.add_middleware(BearerTokenMiddleware, token=config.auth_token)
    if config.cors_origins:
        origins = [o.strip() for o in config.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    install_metrics(app)
    for router in (health_router, generations_router, events_router, backends_router, performance_router):
        app.include_router(router)
    mount_studio(app)  # last: it serves "/" and the static files
    openapi.install(app)
    return app
