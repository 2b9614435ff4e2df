"""GET /api/v1/backends: the shape backends, whether each is ready (and why not), and their parameters.

The answer is the generation service's ListBackends over gRPC, reshaped:

    {"backends": [{"name": "hunyuan3d", "state": "unavailable", "ready": false,
                   "reason": "HUNYUAN3D_MODEL_PATH is not set", "default": false,
                   "description": "...", "device": "cpu", "precision": "",
                   "parameters": {"resolution": {"minimum": 64, "maximum": 512, "default": 256,
                                                  "meaning": "octree resolution of the decoded volume"}, ...}}],
     "default": "inflate"}

The app keeps the generation stub on app.state.generation (gateway/app.py).
"""
from __future__ import annotations

from typing import Any

import grpc
from fastapi import APIRouter, Request

from gateway import errors
from pb.orfeas.generation.v1 import generation_pb2 as pb

router = APIRouter(tags=["backends"])

CALL_DEADLINE_S = 5.0
STATE_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("BACKEND_STATE_").lower() for v in pb.BackendState.DESCRIPTOR.values if v.number
}


def backend_view(backend: pb.Backend) -> dict[str, Any]:
    state = STATE_NAMES.get(backend.state, "unavailable")
    return {
        "name": backend.name,
        "state": state,
        "ready": state == "ready",
        "reason": backend.reason or None,
        "default": backend.is_default,
        "description": backend.description,
        "device": backend.device,
        "precision": backend.precision or None,
        "parameters": {
            p.name: {
                "minimum": _number(p.minimum),
                "maximum": _number(p.maximum),
                "default": _number(p.default),
                "meaning": p.meaning,
            }
            for p in backend.parameters
        },
    }


async def list_backends(request: Request) -> list[dict[str, Any]]:
    try:
        reply = await request.app.state.generation.ListBackends(pb.ListBackendsRequest(), timeout=CALL_DEADLINE_S)
    except grpc.aio.AioRpcError as exc:
        raise errors.from_rpc_error(exc) from None
    return [backend_view(b) for b in reply.backends]


async def backend_readiness(request: Request) -> dict[str, str] | None:
    """For /readyz: each backend's state, with the reason when it is not ready; None when unknown."""
    try:
        backends = await list_backends(request)
    except errors.ApiError:
        return None
    return {b["name"]: b["state"] if b["ready"] else f"{b['state']}: {b['reason']}" for b in backends}


@router.get(
    "/api/v1/backends",
    summary="The shape backends: ready or not (and why), the default, parameter ranges and defaults",
)
async def backends(request: Request) -> dict[str, Any]:
    listed = await list_backends(request)
    default = next((b["name"] for b in listed if b["default"]), None)
    return {"backends": listed, "default": default}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
