"""A job's progress as Server-Sent Events (/events) and over a WebSocket (/ws).

Both replay the job's past events first, then the live ones, and end after
the terminal event (`succeeded`, `failed` or `cancelled`). The WebSocket is
not an HTTP operation, so the document describes it on a GET of its path,
which answers a plain HTTP request with 426 Upgrade Required.

A stream outlives the generation instance serving it: when that instance goes
away (killed, or restarting), the gateway asks again for the events after the
last one it delivered, on another instance or on the same one once it is back
(ResumingWatch), for up to GATEWAY_STREAM_RESUME_S; no event is lost or sent
twice. Only after that does the stream end with an `error` event.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import StreamingResponse

from gateway import errors, views
from gateway.errors import ApiError, ContractRoute, error_responses
from gateway.generations_routes import SERVICE_ERRORS, GenerationId, read_first
from gateway.metrics import subscriber
from gateway.models.errors import ErrorBody
from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common import metrics

router = APIRouter(prefix="/api/v1/generations", tags=["events"], route_class=ContractRoute)

# The Last-Event-ID a browser sends back is a sequence number we wrote; anything else is ignored.
MAX_SEQUENCE_DIGITS = 9
EVENT_NAMES = ("queued", "stage", "succeeded", "failed", "cancelled")


def _sse_event(names: tuple[str, ...], data_schema: str, *, with_id: bool = True) -> dict[str, Any]:
    """One SSE event as schemathesis and readers see it: its name, its id, its data (JSON of a model)."""
    properties: dict[str, Any] = {
        "event": {"type": "string", "enum": list(names)},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": f"#/components/schemas/{data_schema}"},
        },
    }
    required = ["event", "data"]
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+$", "description": "The event's sequence"}
        required.append("id")
    return {"type": "object", "properties": properties, "required": required}


EVENT_STREAM_SCHEMA: dict[str, Any] = {
    "description": "One event of the stream. `queued`: QueuedEvent; `stage`: StageEvent; `succeeded`, `failed`, "
    "`cancelled`: TerminalEvent, the last event; `error`: the stream broke (the generation service restarting, "
    "say), reconnect with Last-Event-ID to resume. Comment lines (`: keep-alive`) come while nothing happens.",
    "oneOf": [
        _sse_event(("queued",), "QueuedEvent"),
        _sse_event(("stage",), "StageEvent"),
        _sse_event(("succeeded", "failed", "cancelled"), "TerminalEvent"),
        {**_sse_event(("error",), "ErrorBody", with_id=False), "description": "No id of its own"},
    ],
}
# Components the stream's schema names; gateway/openapi.py adds them to the document.
EVENT_MODELS = ("QueuedEvent", "StageEvent", "TerminalEvent", "StreamMessage")


@router.get(
    "/{id}/events",
    operation_id="follow_generation_events",
    summary="Server-Sent Events: past events first, then live ones, then the terminal event",
    description="Each event's `id` is its sequence number: reconnect with `Last-Event-ID` to resume after it.",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The event stream (text/event-stream)",
            "content": {"text/event-stream": {"schema": EVENT_STREAM_SCHEMA}},
        },
        **error_responses(400, 404, *SERVICE_ERRORS),
    },
)
async def follow_generation_events(
    request: Request,
    generation_id: GenerationId,
    last_event_id: Annotated[
        str,  # noqa: RUF013 - None: left out, yet the document admits no null
        Header(
            alias="Last-Event-ID",
            description="Resume: only the events after this sequence number (anything but a number is ignored)",
        ),
    ] = None,
) -> StreamingResponse:
    digits = last_event_id is not None and last_event_id.isdigit() and len(last_event_id) <= MAX_SEQUENCE_DIGITS
    after = int(last_event_id) if digits and last_event_id else 0
    config = request.app.state.config
    watch = ResumingWatch(request.app.state.generation, generation_id, after, config.stream_resume_s, "sse")
    # None: resumed after the job's last event, so the stream has nothing more to say.
    first = await read_first(watch)
    return StreamingResponse(
        _sse(watch, first, after, config.sse_keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{id}/ws",
    operation_id="generation_events_websocket",
    summary="WebSocket: the same events as /events, one JSON message each",
    description="Open it as a WebSocket (`Upgrade: websocket`; with a bearer token, `?access_token=`). Each "
    "message is a StreamMessage, `{\"event\": name, \"data\": ...}`, with the names and data of the SSE stream; "
    "the socket closes after the terminal event, or with code 4000 + HTTP status after an `error` message. A "
    "plain HTTP request is answered 426.",
    responses=error_responses(400, 401, 426),
    response_model=None,
    status_code=426,
)
async def generation_events_websocket(generation_id: GenerationId) -> None:
    raise ApiError(
        426,
        "UPGRADE_REQUIRED",
        f"upgrade: /api/v1/generations/{generation_id}/ws speaks WebSocket only (send Upgrade: websocket)",
        headers={"Upgrade": "websocket", "Connection": "Upgrade"},
    )


@router.websocket("/{id}/ws")
async def events_websocket(websocket: WebSocket) -> None:
    generation_id = websocket.path_params["id"]
    await websocket.accept()
    resume_s = websocket.app.state.config.stream_resume_s
    grpc_call = ResumingWatch(websocket.app.state.generation, generation_id, 0, resume_s, "websocket")
    # A client that goes away is noticed at once, not at the next event (which may be minutes off).
    gone = asyncio.ensure_future(_until_disconnected(websocket))
    with subscriber("websocket"):
        try:
            async for message in _read_until(grpc_call, gone):
                name, data = views.event(message)
                await websocket.send_json({"event": name, "data": data.model_dump(mode="json")})
            if not gone.done():
                await websocket.close()
        except grpc.aio.AioRpcError as exc:
            err = errors.from_rpc_error(exc)
            await websocket.send_json({"event": "error", "data": _error_body(err)})
            await websocket.close(code=4000 + err.status)
        except WebSocketDisconnect:
            pass
        finally:
            grpc_call.cancel()
            gone.cancel()


class ResumingWatch:
    """A WatchGeneration call that survives its instance: `read()` as grpc.aio's, resumed after the last event
    read when the instance goes away (UNAVAILABLE), for up to resume_s at a time.

    The new call waits until some instance answers for the job (a GetGeneration that waits for a ready
    instance), then asks for the events after the last one delivered, so none is lost or repeated.
    """

    def __init__(self, stub: Any, generation_id: str, after: int, resume_s: float, transport: str) -> None:
        self.stub = stub
        self.generation_id = generation_id
        self.last = after
        self.resume_s = resume_s
        self.transport = transport
        self.call = self._watch()

    def _watch(self) -> Any:
        return self.stub.WatchGeneration(pb.WatchGenerationRequest(id=self.generation_id, after_sequence=self.last))

    async def read(self) -> Any:
        give_up_at: float | None = None
        while True:
            try:
                message = await self.call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                now = asyncio.get_running_loop().time()
                give_up_at = give_up_at or now + self.resume_s
                if now >= give_up_at or not await self._instance_answers(give_up_at - now):
                    raise
                self.call.cancel()
                self.call = self._watch()
                metrics.stream_resumed(self.transport)
                continue
            if message is grpc.aio.EOF:
                return message
            if message.sequence <= self.last:
                continue  # never twice
            self.last = message.sequence
            return message

    async def _instance_answers(self, within_s: float) -> bool:
        """Wait (up to within_s) for an instance that answers for the job; False when none did."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + within_s
        while (remaining := give_up_at - loop.time()) > 0:
            try:
                await self.stub.GetGeneration(
                    pb.GetGenerationRequest(id=self.generation_id), wait_for_ready=True, timeout=max(0.1, remaining)
                )
                return True
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                # An instance that answers UNAVAILABLE (draining, or its database away): ask again shortly.
                await asyncio.sleep(min(0.25, max(0.0, give_up_at - loop.time())))
        return False

    def cancel(self) -> None:
        self.call.cancel()


def _error_body(err: ApiError) -> dict[str, Any]:
    return ErrorBody.model_validate({"error": {"code": err.code, "message": err.message}}).model_dump()


def _sse_frame(message: pb.GenerationEvent) -> bytes:
    name, data = views.event(message)
    return f"id: {message.sequence}\nevent: {name}\ndata: {data.model_dump_json()}\n\n".encode()


async def _sse(
    call: Any, first: pb.GenerationEvent | None, after: int, keepalive_s: float
) -> AsyncIterator[bytes]:
    """Frames for the events after `after` (Last-Event-ID), with keep-alive comments while nothing happens.

    The stream ends after the terminal event, or with an `error` event saying
    why (the generation service restarting, say: reconnect with Last-Event-ID
    to resume).
    """
    read: asyncio.Future[Any] | None = None
    with subscriber("sse"):
        try:
            if first is None:
                return
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
            yield f"event: error\ndata: {json.dumps(_error_body(errors.from_rpc_error(exc)))}\n\n".encode()
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
