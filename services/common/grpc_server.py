"""What every ORFEAS gRPC service shares: one interceptor that turns
exceptions into statuses, health checking, reflection, and a clean start/stop.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import ResourceExhausted, ServiceError, internal_message

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a 20 MiB picture plus the request around it


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    if isinstance(exc, ServiceError):
        trailers: tuple[tuple[str, str], ...] = ()
        if isinstance(exc, ResourceExhausted) and exc.retry_after_s is not None:
            trailers = (("retry-after", str(max(1, round(exc.retry_after_s)))),)
        return exc.code, exc.message, trailers
    if isinstance(exc, asyncio.TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", ()
    return grpc.StatusCode.INTERNAL, internal_message(exc), ()


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    code, message, trailers = _status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("unhandled error in %s", method, exc_info=exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, message)


class ExceptionToStatusInterceptor(grpc.aio.ServerInterceptor):
    """Servicer code raises ServiceError subclasses; clients see their status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the one place that maps them
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream and not inspect.isasyncgenfunction(handler.unary_stream):
            # A handler that writes with context.write() (the health service's Watch, which gRPC's client-side
            # health checking calls): awaited, not iterated.
            inner_writer = handler.unary_stream

            async def unary_stream_writer(request: Any, context: grpc.aio.ServicerContext) -> None:
                try:
                    await inner_writer(request, context)
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream_writer, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                stream = inner_us(request, context)
                try:
                    async for item in stream:
                        yield item
                except (grpc.aio.AbortError, asyncio.CancelledError):
                    raise
                except Exception as exc:  # noqa: BLE001
                    await _abort(context, exc, method)
                finally:
                    # Close the servicer's generator now (not whenever it is
                    # collected), so its clean-up sees a cancelled call at once.
                    await stream.aclose()

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def create_server(
    service_names: Iterable[str],
    interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with the interceptor, health and reflection installed.

    The caller adds its servicers, binds a port and sets the health status.
    """
    server = grpc.aio.server(
        interceptors=[ExceptionToStatusInterceptor(), *interceptors],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("", *service_names):
        await health_servicer.set(name, status)


async def serve_until_signalled(
    server: grpc.aio.Server,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    grace_s: float = 10.0,
) -> None:
    """Run until SIGINT/SIGTERM, then drain (on_stop), then stop the server.

    on_stop runs while calls are still served (it turns health to
    NOT_SERVING first), so clients can follow and fetch work that finishes
    during the drain; only then does the server refuse calls, giving the
    ones in flight a few seconds.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.0fs)", grace_s)
    if on_stop is not None:
        await on_stop()
    await server.stop(min(grace_s, 5.0))
