"""Browser plumbing for the Studio tests: Debian's chromium under Playwright,
a record of every request the page makes, screenshots, and pixel checks."""
from __future__ import annotations

import io
from decimal import ROUND_HALF_UP, Decimal
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import Browser, BrowserContext, Page, Playwright

CHROMIUM = Path("/usr/bin/chromium")
# Software WebGL (SwiftShader) is all a machine without a GPU has; without
# --enable-unsafe-swiftshader chromium refuses it and the viewer gets no context.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--enable-unsafe-swiftshader", "--disable-background-networking"]
SHOTS = Path(__file__).parent / "artifacts" / "studio"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
# The viewer's clear colour (viewer.js BACKGROUND).
VIEWER_BACKGROUND = (0xEE, 0xF1, 0xF5)


def launch(playwright: Playwright) -> Browser:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: `make install` installs Debian's chromium"
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=30_000)


@dataclass
class Traffic:
    """Every URL the pages asked for: documents, modules, fetches, streams, sockets."""

    urls: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> Page:
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("websocket", lambda ws: self.urls.append(ws.url))
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        return page


def new_page(browser: Browser, traffic: Traffic, viewport: dict[str, int]) -> tuple[BrowserContext, Page]:
    context = browser.new_context(viewport=viewport, accept_downloads=True)
    page = traffic.watch(context.new_page())
    page.set_default_timeout(20_000)
    return context, page


def shot(page: Page, name: str, full_page: bool = True) -> Path:
    """The whole page, or (full_page=False) the screen as a person sees it where it is scrolled to."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size or {}
    path = SHOTS / f"{size.get('width')}x{size.get('height')}-{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


def covered_fraction(png: bytes) -> float:
    """Share of the pixels that are not the viewer's background colour."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    distance = np.abs(pixels - np.array(VIEWER_BACKGROUND, dtype=np.int16)).max(axis=-1)
    return float((distance > 24).mean())


def colour_spread(png: bytes) -> float:
    """Standard deviation of the luminance over the pixels that are not background."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)
    distance = np.abs(pixels - np.array(VIEWER_BACKGROUND)).max(axis=-1)
    model = pixels[distance > 24]
    if len(model) == 0:
        return 0.0
    return float((model @ np.array([0.299, 0.587, 0.114])).std())


# Mirrors of gateway/static/js/format.js, so the tests can compare the page's
# text with the API's numbers. JavaScript's toFixed and Math.round take a tie
# upwards where Python's format takes it to even, hence the Decimal rounding.
def _fixed(x: float, digits: int) -> str:
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def fmt_seconds(s: float) -> str:
    if s < 1:
        return f"{_fixed(s * 1000, 0)} ms"
    if s < 100:
        return f"{_fixed(s, 2)} s"
    return f"{_fixed(s, 0)} s"


def fmt_percent(share: float) -> str:
    return f"{_fixed(share * 100, 1)}%"


def fmt_count(n: int) -> str:
    return f"{n:,}"
