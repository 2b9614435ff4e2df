"""The REST gateway: REST in, gRPC out, progress as Server-Sent Events and WebSocket.

It holds no state of its own: every answer comes from the generation and
telemetry services, so restarting the gateway changes nothing a client sees.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway import errors, views
from gateway.metrics import install_metrics, subscriber
from gateway.performance_routes import router as performance_router
from gateway.backends_routes import backend_readiness, router as backends_router
from gateway.studio import mount_studio
from gateway.errors import ApiError
from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc
from pb.orfeas.telemetry.v1 import telemetry_pb2_grpc
from gateway.auth import BearerTokenMiddleware
from services.common.config import GatewayConfig, SecurityConfig
from services.common.grpc_security import create_channel

log = logging.getLogger("gateway")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
TELEMETRY_SERVICE = "orfeas.telemetry.v1.TelemetryService"  # not imported: the gateway needs only its name

INT_FIELDS = ("seed", "resolution", "steps", "face_count", "texture_size")
FLOAT_FIELDS = ("foreground_ratio", "timeout_seconds", "guidance_scale")
PARAMETER_FIELDS = (
    *INT_FIELDS,
    *FLOAT_FIELDS,
    "texture",
    "remove_background",
    "format",
    "backend",
    "request_id",
)

GENERATE_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        # resolution, steps and guidance_scale: the widest ranges; each backend's own are in
        # GET /api/v1/backends (inflate: 64-1024, 1-500; hunyuan3d: 64-512, 1-100, guidance 0-20).
        "resolution": {
            "type": "integer", "minimum": 64, "maximum": 1024, "default": 256,
            "description": "inflate: reconstruction grid, 64-1024; hunyuan3d: octree resolution, 64-512",
        },
        "steps": {
            "type": "integer", "minimum": 1, "maximum": 500,
            "description": "inflate: solver iterations, 1-500, default 50; hunyuan3d: denoising steps, 1-100, "
                           "default 30",
        },
        "guidance_scale": {
            "type": "number", "minimum": 0, "maximum": 20,
            "description": "hunyuan3d: classifier-free guidance, default 5.0; inflate ignores it (reported as 0)",
        },
        "face_count": {"type": "integer", "minimum": 1000, "maximum": 500000, "default": 40000},
        "texture": {"type": "boolean", "default": True},
        "texture_size": {"type": "integer", "minimum": 256, "maximum": 4096, "default": 1024},
        "remove_background": {"type": "string", "enum": ["auto", "on", "off"], "default": "auto"},
        "foreground_ratio": {"type": "number", "minimum": 0.5, "maximum": 1.0, "default": 0.85},
        "format": {"type": "string", "enum": ["glb", "obj", "stl", "ply"], "default": "glb"},
        "backend": {
            "type": "string", "enum": ["inflate", "hunyuan3d"], "default": "inflate",
            "description": "hunyuan3d needs its weights on the service (HUNYUAN3D_MODEL_PATH); when it is not "
                           "ready the answer is 412 FAILED_PRECONDITION saying why",
        },
        "request_id": {"type": "string", "maxLength": 128},
        "timeout_seconds": {"type": "number", "minimum": 0, "maximum": 86400, "default": 0},
    },
}


def create_app(config: GatewayConfig | None = None) -> FastAPI:
    config = config or GatewayConfig.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        security = SecurityConfig.from_env()
        generation_channel = create_channel(config.generation_address, security)
        telemetry_channel = create_channel(config.telemetry_address, security)
        app.state.generation = pb_grpc.GenerationServiceStub(generation_channel)
        app.state.generation_health = health_pb2_grpc.HealthStub(generation_channel)
        app.state.telemetry_channel = telemetry_channel
        app.state.telemetry_stub = telemetry_pb2_grpc.TelemetryServiceStub(telemetry_channel)
        app.state.telemetry_health = health_pb2_grpc.HealthStub(telemetry_channel)
        yield
        await generation_channel.close()
        await telemetry_channel.close()

    app = FastAPI(
        title="ORFEAS 2D→3D",
        version="1.0",
        description="One picture in, a watertight textured mesh out.",
        lifespan=lifespan,
    )
    app.state.config = config
    errors.install(app)
    if config.auth_token:
        app.add_middleware(BearerTokenMiddleware, token=config.auth_token)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = [o.strip() for o in config.cors_origins.split(",") if o.strip()]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    install_metrics(app)
    _routes(app, config)
    app.include_router(performance_router)
    app.include_router(backends_router)
    mount_studio(app)  # last: it serves "/" and the static files
    return app


def _stub(request: Request | WebSocket) -> pb_grpc.GenerationServiceStub:
    return request.app.state.generation


def _routes(app: FastAPI, config: GatewayConfig) -> None:
    @app.get("/healthz", tags=["health"], summary="The gateway process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], summary="Ready when the generation service passes its health check")
    async def readyz(request: Request) -> JSONResponse:
        generation_ok, telemetry_ok = await asyncio.gather(
            _healthy(request.app.state.generation_health, GENERATION_SERVICE),
            _healthy(request.app.state.telemetry_health, TELEMETRY_SERVICE),
        )
        checks = {
            "generation": "serving" if generation_ok else "unavailable",
            "telemetry": "serving" if telemetry_ok else "unavailable",
        }
        if not generation_ok:
            return JSONResponse({"status": "unavailable", "checks": checks}, status_code=503)
        # Each shape backend's state; one that is not ready (inflate always is) says why.
        backends, status = await asyncio.gather(backend_readiness(request), _service_status(request))
        degraded: list[str] = []
        if status is not None and status.HasField("storage"):
            checks["storage"] = "ok" if status.storage.ok else status.storage.message
            if not status.storage.ok:
                degraded.append("storage")
        if not telemetry_ok:
            degraded.append("telemetry")
        body = {"status": "degraded" if degraded else "ready", "checks": checks, "backends": backends}
        if degraded:
            body["degraded"] = degraded
        return JSONResponse(body)

    @app.post(
        "/api/v1/generations",
        status_code=202,
        tags=["generations"],
        summary="Submit a picture; returns the queued job",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["image"],
                            "properties": {
                                "image": {"type": "string", "format": "binary"},
                                **GENERATE_REQUEST_SCHEMA["properties"],
                            },
                        }
                    },
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["image_base64"],
                            "properties": {
                                "image_base64": {"type": "string", "format": "byte"},
                                **GENERATE_REQUEST_SCHEMA["properties"],
                            },
                        }
                    },
                },
            }
        },
    )
    async def submit(
        request: Request, idempotency_key: str | None = Header(default=None, alias="Idempotency-Key")
    ) -> JSONResponse:
        image, fields = await _read_submission(request, config.max_upload_bytes)
        grpc_request = _generate_request(image, fields, idempotency_key)
        generation = await _call(_stub(request).SubmitGeneration(grpc_request))
        view = views.generation(generation)
        body = {"id": view["id"], "status": view["status"], "queue_position": view["queue_position"],
                "links": view["links"]}
        return JSONResponse(body, status_code=202, headers={"Location": view["links"]["self"]})

    @app.get("/api/v1/generations", tags=["generations"], summary="List jobs, newest first")
    async def list_generations(
        request: Request,
        page_size: int = Query(20, ge=1, le=100),
        page_token: str = Query("", max_length=200),
        status: str | None = Query(None, pattern="^(queued|running|succeeded|failed|cancelled)$"),
    ) -> dict[str, Any]:
        response = await _call(
            _stub(request).ListGenerations(
                pb.ListGenerationsRequest(
                    page_size=page_size, page_token=page_token, status=views.STATUS_VALUES.get(status or "", 0)
                )
            )
        )
        return {
            "generations": [views.generation(g) for g in response.generations],
            "next_page_token": response.next_page_token or None,
        }

    @app.get("/api/v1/generations/{generation_id}", tags=["generations"], summary="A job's status and result")
    async def get_generation(request: Request, generation_id: str) -> dict[str, Any]:
        generation = await _call(_stub(request).GetGeneration(pb.GetGenerationRequest(id=generation_id)))
        return views.generation(generation)

    @app.delete("/api/v1/generations/{generation_id}", tags=["generations"], summary="Cancel a job")
    async def cancel_generation(request: Request, generation_id: str) -> dict[str, Any]:
        generation = await _call(_stub(request).CancelGeneration(pb.CancelGenerationRequest(id=generation_id)))
        return views.generation(generation)

    @app.get(
        "/api/v1/generations/{generation_id}/events",
        tags=["generations"],
        summary="Server-Sent Events: past events first, then live ones, then the terminal event",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        request: Request,
        generation_id: str,
        last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
    ) -> StreamingResponse:
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() and len(last_event_id) < 10 else 0
        call = _stub(request).WatchGeneration(pb.WatchGenerationRequest(id=generation_id, after_sequence=after))
        first = await _first_message(call)
        return StreamingResponse(
            _sse(call, first, after, config.sse_keepalive_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.websocket("/api/v1/generations/{generation_id}/ws")
    async def events_ws(websocket: WebSocket, generation_id: str) -> None:
        await websocket.accept()
        call = _stub(websocket).WatchGeneration(pb.WatchGenerationRequest(id=generation_id))
        # A client that goes away is noticed at once, not at the next event (which may be minutes off).
        gone = asyncio.ensure_future(_until_disconnected(websocket))
        with subscriber("websocket"):
            try:
                async for message in _read_until(call, gone):
                    name, data = views.event(message)
                    await websocket.send_json({"event": name, "data": data})
                if not gone.done():
                    await websocket.close()
            except grpc.aio.AioRpcError as exc:
                err = errors.from_rpc_error(exc)
                await websocket.send_json(
                    {"event": "error", "data": {"error": {"code": err.code, "message": err.message}}}
                )
                await websocket.close(code=4000 + err.status)
            except WebSocketDisconnect:
                pass
            finally:
                call.cancel()
                gone.cancel()

    @app.get(
        "/api/v1/generations/{generation_id}/result",
        tags=["generations"],
        summary="Download the mesh",
        response_class=StreamingResponse,
        responses={200: {"content": {"model/gltf-binary": {}, "application/zip": {}, "model/stl": {},
                                     "application/octet-stream": {}}}},
    )
    async def result(
        request: Request,
        generation_id: str,
        format: str | None = Query(None, pattern="^(glb|obj|stl|ply)$", description="default: the job's format"),
    ) -> StreamingResponse:
        call = _stub(request).DownloadResult(
            pb.DownloadResultRequest(id=generation_id, format=views.FORMAT_VALUES.get(format or "", 0))
        )
        first = await _first_message(call)

        async def body() -> AsyncIterator[bytes]:
            yield first.data
            # read() once used, the call cannot be iterated: read on to the end.
            while (chunk := await call.read()) is not grpc.aio.EOF:
                yield chunk.data

        return StreamingResponse(
            body(),
            media_type=first.content_type,
            headers={
                "Content-Disposition": f'attachment; filename="{first.filename}"',
                "Content-Length": str(first.total_bytes),
                "ETag": f'"{first.sha256}"',
            },
        )


async def _service_status(request: Request) -> pb.ServiceStatus | None:
    try:
        return await _stub(request).GetServiceStatus(pb.GetServiceStatusRequest(), timeout=1.0)
    except grpc.aio.AioRpcError:
        return None


async def _healthy(stub: health_pb2_grpc.HealthStub, service: str) -> bool:
    try:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
    except grpc.aio.AioRpcError:
        return False
    return response.status == health_pb2.HealthCheckResponse.SERVING


async def _call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise errors.from_rpc_error(exc) from None


async def _first_message(call: Any) -> Any:
    """Read the first message so that NOT_FOUND and friends become HTTP errors, not a broken stream."""
    try:
        message = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise errors.from_rpc_error(exc) from None
    if message is grpc.aio.EOF:
        raise ApiError(502, "INTERNAL", "the generation service ended the stream without data")
    return message


def _sse_frame(message: pb.GenerationEvent) -> bytes:
    name, data = views.event(message)
    return f"id: {message.sequence}\nevent: {name}\ndata: {json.dumps(data)}\n\n".encode()


async def _sse(call: Any, first: pb.GenerationEvent, after: int, keepalive_s: float) -> AsyncIterator[bytes]:
    """Frames for the events after `after` (Last-Event-ID), with keep-alive comments while nothing happens.

    The stream ends after the terminal event, or with an `error` event saying
    why (the generation service restarting, say: reconnect with Last-Event-ID
    to resume).
    """
    read: asyncio.Future[Any] | None = None
    with subscriber("sse"):
        try:
            if first.sequence > after:
                yield _sse_frame(first)
            if first.kind == pb.EVENT_KIND_TERMINAL:
                return
            # The pending read is never cancelled: a timed-out wait_for on call.read() would cancel
            # the read, and grpc.aio cancels the whole call with it.
            read = asyncio.ensure_future(call.read())
            while True:
                done, _ = await asyncio.wait({read}, timeout=keepalive_s)
                if not done:
                    yield b": keep-alive\n\n"
                    continue
                message = read.result()
                if message is grpc.aio.EOF:
                    return
                if message.sequence > after:
                    yield _sse_frame(message)
                if message.kind == pb.EVENT_KIND_TERMINAL:
                    return
                read = asyncio.ensure_future(call.read())
        except grpc.aio.AioRpcError as exc:
            err = errors.from_rpc_error(exc)
            error = {"error": {"code": err.code, "message": err.message}}
            yield f"event: error\ndata: {json.dumps(error)}\n\n".encode()
        finally:
            if read is not None:
                read.cancel()
            call.cancel()


async def _until_disconnected(websocket: WebSocket) -> None:
    """Returns when the client closes the WebSocket (it sends nothing else we need)."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


async def _read_until(call: Any, gone: asyncio.Future[None]) -> AsyncIterator[Any]:
    """The call's messages, until it ends or `gone` is done (then the caller cancels the call)."""
    while True:
        read = asyncio.ensure_future(call.read())
        done, _ = await asyncio.wait({read, gone}, return_when=asyncio.FIRST_COMPLETED)
        if read not in done:
            read.cancel()
            return
        message = read.result()
        if message is grpc.aio.EOF:
            return
        yield message


async def _read_submission(request: Request, max_upload_bytes: int) -> tuple[bytes, dict[str, Any]]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    # Base64 is a third larger than the bytes it carries; allow for it and the other fields.
    limit = max_upload_bytes * 4 // 3 + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"image: upload over the limit of {max_upload_bytes:,} bytes")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"image: upload over the limit of {max_upload_bytes:,} bytes")
    # Starlette's form parser reads a cached body when there is one, so the
    # limited read above is what it parses.
    request._body = bytes(body)  # noqa: SLF001

    if content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=len(PARAMETER_FIELDS) + 1, max_part_size=1024)
        except StarletteHTTPException as exc:
            raise ApiError(400, "INVALID_ARGUMENT", f"body: malformed multipart form: {exc.detail}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "INVALID_ARGUMENT", "image: a file field named 'image' is required")
        image = await upload.read()
        fields = {k: v for k, v in form.items() if k != "image"}
    elif content_type == "application/json":
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "INVALID_ARGUMENT", "body: not valid JSON") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "body: must be a JSON object")
        encoded = payload.pop("image_base64", None)
        if not isinstance(encoded, str) or not encoded:
            raise ApiError(400, "INVALID_ARGUMENT", "image_base64: is required (the picture, base64-encoded)")
        try:
            image = await asyncio.to_thread(base64.b64decode, encoded, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "INVALID_ARGUMENT", "image_base64: not valid base64") from None
        fields = payload
    else:
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"body: send multipart/form-data (file field 'image') or application/json (image_base64), "
            f"not {content_type or 'no content type'}",
        )
    if len(image) > max_upload_bytes:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"image: {len(image):,} bytes, over the limit of {max_upload_bytes:,}")
    if not image:
        raise ApiError(400, "INVALID_ARGUMENT", "image: is empty")
    unknown = sorted(set(fields) - set(PARAMETER_FIELDS))
    if unknown:
        raise ApiError(400, "INVALID_ARGUMENT", f"{unknown[0]}: unknown field")
    return image, fields


def _generate_request(image: bytes, fields: dict[str, Any], idempotency_key: str | None) -> pb.GenerateRequest:
    request = pb.GenerateRequest(image=image)
    for name in INT_FIELDS:
        if fields.get(name) is not None and fields.get(name) != "":
            value = _as_int(name, fields[name])
            limit = 2**64 - 1 if name == "seed" else 2**31 - 1
            low = 0 if name == "seed" else -(2**31)
            if not low <= value <= limit:
                raise ApiError(400, "INVALID_ARGUMENT", f"{name}: {value} is out of range")
            setattr(request, name, value)
    for name in FLOAT_FIELDS:
        if fields.get(name) is not None and fields.get(name) != "":
            setattr(request, name, _as_float(name, fields[name]))
    if fields.get("texture") is not None and fields.get("texture") != "":
        request.texture = _as_bool("texture", fields["texture"])
    if fields.get("format"):
        request.format = _enum("format", fields["format"], views.FORMAT_VALUES)
    if fields.get("remove_background"):
        request.remove_background = _enum("remove_background", fields["remove_background"], views.BACKGROUND_VALUES)
    if fields.get("backend"):
        request.backend = _as_str("backend", fields["backend"])
    request_id = _as_str("request_id", fields["request_id"]) if fields.get("request_id") else ""
    if idempotency_key:
        if request_id and request_id != idempotency_key:
            raise ApiError(400, "INVALID_ARGUMENT", "request_id: differs from the Idempotency-Key header")
        request_id = idempotency_key
    request.request_id = request_id
    return request


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a whole number, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a whole number, got {str(value)[:40]!r}")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a number, got {str(value)[:40]!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a finite number")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "on", "yes", "false", "0", "off", "no"):
        return value.strip().lower() in ("true", "1", "on", "yes")
    raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be true or false, got {str(value)[:40]!r}")


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be a string")
    return value


def _enum(name: str, value: Any, allowed: dict[str, int]) -> int:
    text = _as_str(name, value).strip().lower()
    if text not in allowed:
        raise ApiError(400, "INVALID_ARGUMENT", f"{name}: must be one of {', '.join(allowed)}, got {str(value)[:40]!r}")
    return allowed[text]
