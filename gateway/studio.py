"""The Studio page: served at `/`, its assets under `/static/`.

The page is plain files (gateway/static/); three.js comes from npm and
`make install` copies the few modules the viewer imports into
gateway/static/vendor/ (git ignores it).

Every answer of the page carries a Content-Security-Policy that allows its
own origin only, so a change that made the page reach a CDN or a web font
would fail in the browser, not pass unnoticed.
"""
from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR_MARKER = STATIC_DIR / "vendor" / "three" / "build" / "three.module.js"
_INLINE_SCRIPT = re.compile(r"<script[^>]*>(.*?)</script>", re.S)


def content_security_policy(html: str) -> str:
    # The import map has to be inline (browsers ignore src= on it), so it is
    # allowed by its hash rather than by 'unsafe-inline'.
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
        for body in _INLINE_SCRIPT.findall(html)
        if body.strip()
    )
    return (
        "default-src 'self'; "
        f"script-src 'self' {hashes}; "
        # GLTFLoader hands the GLB's embedded texture to the decoder as a blob: URL.
        "img-src 'self' blob: data:; "
        "connect-src 'self' blob:; "
        "style-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


class _NoCache:
    """Assets revalidate on every load: the page and its modules change together
    on an upgrade, and a stale studio.js beside a new index.html breaks."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"cache-control", b"no-cache"))
            await send(message)

        await self.app(scope, receive, send_with_header)


router = APIRouter(include_in_schema=False)
INDEX = STATIC_DIR / "index.html"


@router.get("/", response_class=HTMLResponse)
async def studio() -> HTMLResponse:
    # Read per request so an edited page shows without a restart; it is a few KB.
    html = INDEX.read_text(encoding="utf-8")
    if not VENDOR_MARKER.exists():
        # Without three.js the page would load and then fail quietly; say why instead.
        html = html.replace(
            "<!--vendor-status-->",
            '<p class="banner" role="alert">The 3D viewer is not installed: run <code>make install</code>.</p>',
        )
    return HTMLResponse(
        html,
        headers={"Content-Security-Policy": content_security_policy(html), "Cache-Control": "no-cache"},
    )


def mount_studio(app: FastAPI) -> None:
    """The page's route and its static files; last, since the files are served under a mount."""
    app.include_router(router)
    app.mount("/static", _NoCache(StaticFiles(directory=STATIC_DIR)), name="static")
