"""The shared token and TLS, for gRPC servers and channels alike."""
from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from services.common.config import SecurityConfig

# Load balancers and orchestrators probe health without credentials.
OPEN_METHOD_PREFIXES = (f"/{health.SERVICE_NAME}/",)

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    # Reconnect within a second or two of a restarted service; gRPC's own
    # back-off grows to two minutes, which outlasts any restart.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def names_several_backends(address: str) -> bool:
    """A target the resolver may turn into several addresses: an ipv4:/ipv6: list, or a name (dns:///...)."""
    scheme = address.split(":", 1)[0]
    return scheme == "dns" or (scheme in ("ipv4", "ipv6") and "," in address)


def balancing_options(address: str, service: str, retried_methods: Sequence[str]) -> list[tuple[str, Any]]:
    """Channel options that spread calls over every instance behind `address` with gRPC's round_robin.

    With several instances the channel also watches each one's gRPC health (`service`), so an instance
    that is draining (NOT_SERVING) or gone takes no new calls; calls that read (retried_methods) are
    tried again, on another instance, when the one they reached went away before answering (UNAVAILABLE).
    One plain host:port keeps the health of today: its calls are served while it drains.
    """
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": service, "method": method} for method in retried_methods],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    if names_several_backends(address):
        config["healthCheckConfig"] = {"serviceName": service}
    return [("grpc.service_config", json.dumps(config)), ("grpc.enable_retries", 1)]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` (UNAUTHENTICATED)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_METHOD_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        given = metadata.get("authorization", "")
        given_bytes = given.encode() if isinstance(given, str) else given
        if hmac.compare_digest(given_bytes, self._expected):
            return await continuation(handler_call_details)
        return _deny(await continuation(handler_call_details))


def _deny(handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
    if handler is None:
        return None

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service token (authorization metadata)")

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong service token (authorization metadata)")
        yield  # pragma: no cover - makes this an async generator

    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            refuse_stream, handler.request_deserializer, handler.response_serializer
        )
    return grpc.unary_unary_rpc_method_handler(refuse, handler.request_deserializer, handler.response_serializer)


def server_interceptors(security: SecurityConfig) -> list[grpc.aio.ServerInterceptor]:
    return [TokenAuthInterceptor(security.service_token)] if security.service_token else []


def bind(server: grpc.aio.Server, address: str, security: SecurityConfig) -> int:
    """Bind with TLS when configured; return the port (the one the kernel chose for port 0)."""
    if security.tls_cert and security.tls_key:
        credentials = grpc.ssl_server_credentials(
            [(Path(security.tls_key).read_bytes(), Path(security.tls_cert).read_bytes())]
        )
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)


def _with_token(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*header)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready)


# grpc.aio files an interceptor under the first interface it implements, so
# each kind of call needs its own class.
class _UnaryUnaryToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return await continuation(_with_token(client_call_details, self._header), request)


class _UnaryStreamToken(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return await continuation(_with_token(client_call_details, self._header), request)


def create_channel(
    address: str,
    security: SecurityConfig | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> grpc.aio.Channel:
    """An aio channel to one of our services, with the token and TLS the configuration asks for."""
    security = security or SecurityConfig.from_env()
    token = security.service_token
    interceptors = [_UnaryUnaryToken(token), _UnaryStreamToken(token)] if token else None
    all_options = [*CHANNEL_OPTIONS, *(options or [])]
    if security.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(security.tls_ca).read_bytes())
        return grpc.aio.secure_channel(address, credentials, options=all_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=all_options, interceptors=interceptors)


def sync_channel(address: str, security: SecurityConfig | None = None) -> grpc.Channel:
    """A blocking channel (scripts, the stack launcher's health checks)."""
    security = security or SecurityConfig.from_env()
    if security.tls_ca:
        credentials = grpc.ssl_channel_credentials(root_certificates=Path(security.tls_ca).read_bytes())
        channel = grpc.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    if security.service_token:
        channel = grpc.intercept_channel(channel, _SyncToken(security.service_token))
    return channel


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):  # noqa: ANN001, ANN202
        return _SyncDetails(details.method, details.timeout, [*(details.metadata or ()), self._header],
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # noqa: ANN001, ANN201
        return continuation(self._details(client_call_details), request)


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # noqa: ANN001
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression
