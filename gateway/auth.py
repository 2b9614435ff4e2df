"""The optional bearer token in front of the API (GATEWAY_AUTH_TOKEN)."""
from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

# Health probes, metrics, the docs and the Studio page's files stay open;
# everything under /api/ needs the token.
PROTECTED_PREFIX = "/api/"


class BearerTokenMiddleware:
    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401})
            return
        body = json.dumps({"error": {"code": "UNAUTHENTICATED", "message": "authorization: a valid bearer token is required"}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b"Bearer"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope.get("headers", ()):
            if key == b"authorization" and hmac.compare_digest(value, self._expected):
                return True
        if scope["type"] == "websocket":
            # Browsers cannot set headers on a WebSocket; they pass the token in the query.
            query = parse_qs(scope.get("query_string", b"").decode())
            token = (query.get("access_token") or [""])[0].encode()
            return bool(token) and hmac.compare_digest(token, self._token)
        return False
