"""The gateway's metrics: requests by route template and status, event
subscribers, and `GET /metrics` in the Prometheus text format.

    install_metrics(app)                  # in create_app, once
    with subscriber("sse"):               # around an event stream's body
        ...

The metrics themselves are defined in services/common/metrics.py.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import metrics

METRICS_PATH = "/metrics"
# Paths no route matched: one label value, so a scanner cannot blow up the
# number of series with made-up URLs.
UNMATCHED = "unmatched"


@contextmanager
def subscriber(transport: str) -> Iterator[None]:
    """Count a client following events over `transport` (sse or websocket) while inside."""
    metrics.subscriber_joined(transport)
    try:
        yield
    finally:
        metrics.subscriber_left(transport)


def _route_template(scope: Scope) -> str:
    # FastAPI's router leaves the matched route in the scope once it has run.
    route = scope.get("route")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED


class MetricsMiddleware:
    """Pure ASGI, so streamed bodies (SSE, downloads) pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or scope.get("path") == METRICS_PATH:
            # The scraper's own polls would otherwise be most of the traffic counted.
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # A websocket that is never accepted is refused with 403 by the server.
        status = 500 if kind == "http" else 403

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "websocket.accept":
                status = 101
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            method = scope.get("method", "GET") if kind == "http" else "WEBSOCKET"
            metrics.record_http_request(_route_template(scope), method, status, time.perf_counter() - started)


async def metrics_endpoint(_: Request) -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)


def install_metrics(app: FastAPI) -> FastAPI:
    metrics.declare_service("gateway")
    app.add_middleware(MetricsMiddleware)
    app.add_route(METRICS_PATH, metrics_endpoint, methods=["GET"], include_in_schema=False)
    return app
