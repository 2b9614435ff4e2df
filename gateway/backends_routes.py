"""GET /api/v1/backends: the shape backends, whether each is ready (and why not), and their parameters.

The answer is the generation service's ListBackends over gRPC, reshaped into
gateway/models/backends.py. The app keeps the generation stub on
app.state.generation (gateway/app.py).
"""
from __future__ import annotations

import grpc
from fastapi import APIRouter, Request

from gateway import errors
from gateway import parameters as p
from gateway.errors import ContractRoute, error_responses
from gateway.models.backends import BackendList, BackendView, ParameterRangeView
from pb.orfeas.generation.v1 import generation_pb2 as pb

router = APIRouter(tags=["backends"], route_class=ContractRoute)

CALL_DEADLINE_S = 5.0
STATE_NAMES: dict[int, str] = dict(
    zip(sorted(v.number for v in pb.BackendState.DESCRIPTOR.values if v.number), p.BACKEND_STATES)
)


def backend_view(backend: pb.Backend) -> BackendView:
    state = STATE_NAMES.get(backend.state, "unavailable")
    return BackendView(
        name=backend.name,
        state=state,
        ready=state == "ready",
        reason=backend.reason or None,
        default=backend.is_default,
        description=backend.description,
        device=backend.device,
        precision=backend.precision or None,
        variant=backend.variant or None,
        parameters={
            r.name: ParameterRangeView(
                minimum=_number(r.minimum), maximum=_number(r.maximum), default=_number(r.default), meaning=r.meaning
            )
            for r in backend.parameters
        },
    )


async def list_backends(request: Request) -> list[BackendView]:
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
    return {b.name: b.state if b.ready else f"{b.state}: {b.reason}" for b in backends}


@router.get(
    "/api/v1/backends",
    operation_id="list_backends",
    summary="The shape backends: ready or not (and why), the default, parameter ranges and defaults",
    response_model=BackendList,
    response_description="Every backend the service knows, and the default",
    responses=error_responses(401, 500, 502, 503, 504),
)
async def backends(request: Request) -> BackendList:
    listed = await list_backends(request)
    default = next((b.name for b in listed if b.default), None)
    return BackendList(backends=listed, default=default)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
