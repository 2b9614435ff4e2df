"""The Studio behind GATEWAY_AUTH_TOKEN, in a real browser: it asks for the token once, says plainly when
the token is wrong, and with the right one uploads, watches, shows the model and its cut-out, and
downloads; without the token nothing under /api/ answers."""
from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trimesh
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.stack import Stack
from tests.conftest import new_stack
from tests.images import photo_png
from tests.studio_helpers import DESKTOP, Traffic, launch, new_page, shot

TOKEN = "studio-secret-token-1"
FAST = {"resolution": "96", "face_count": "4000", "texture_size": "256"}
LABELS = {"resolution": "Resolution", "face_count": "Face count", "texture_size": "Texture size"}

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = new_stack(tmp_path_factory.mktemp("token"), "studio-token", GATEWAY_AUTH_TOKEN=TOKEN)
    stack.start_all()
    yield stack
    stack.stop_all()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


def test_without_the_token_nothing_under_api_answers(secured: Stack) -> None:
    with httpx.Client(base_url=secured.gateway_url, timeout=30) as http:
        for path in ("/api/v1/generations", "/api/v1/backends", "/api/performance/summary", "/api/gpu/status",
                     "/api/v1/generations/0123456789abcdef/events"):
            response = http.get(path)
            assert response.status_code == 401, (path, response.status_code)
            assert response.json()["error"]["code"] == "UNAUTHENTICATED"
        assert http.get("/").status_code == 200  # the page itself is open: it asks for the token


def enter_token(page: Page, token: str) -> None:
    dialog = page.locator("#token-dialog")
    expect(dialog).to_be_visible()
    page.get_by_label("Access token", exact=True).fill(token)
    with page.expect_navigation():
        page.get_by_role("button", name="Use this token").click()


def test_the_studio_asks_once_refuses_a_wrong_token_and_works_with_the_right_one(
    browser: Browser, secured: Stack, tmp_path: Path
) -> None:
    traffic = Traffic()
    context, page = new_page(browser, traffic, DESKTOP)
    responses: list[tuple[str, int, str | None]] = []
    page.on("response", lambda r: responses.append((r.url, r.status, r.request.headers.get("authorization"))))
    try:
        page.goto(secured.gateway_url + "/")
        expect(page.locator("#token-message")).to_contain_text("GATEWAY_AUTH_TOKEN")
        shot(page, "token-01-asked")
        enter_token(page, "not-the-token")
        expect(page.locator("#token-message")).to_contain_text("refused that token")
        shot(page, "token-02-refused")
        enter_token(page, TOKEN)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#token-dialog")).to_be_hidden()
        responses.clear()

        picture = tmp_path / "astronaut.png"
        picture.write_bytes(photo_png("astronaut", 320))
        page.locator("#image").set_input_files(picture)
        for name, value in FAST.items():
            page.get_by_label(LABELS[name], exact=True).fill(value)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator('#stages li[data-state="completed"]')).to_have_count(5, timeout=90_000)
        expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")
        expect(page.locator("#viewer")).to_have_attribute("data-state", "ready", timeout=30_000)
        # The cut-out the model was given, at the picture's own size.
        expect(page.locator("#cutout-figure")).to_be_visible()
        assert page.evaluate("document.querySelector('#cutout').naturalWidth") == 320
        shot(page, "token-03-done")

        with page.expect_download(timeout=20_000) as info:
            page.locator('#downloads a[data-format="stl"]').click()
        path = tmp_path / info.value.suggested_filename
        info.value.save_as(path)
        assert path.suffix == ".stl"
        mesh = trimesh.load(io.BytesIO(path.read_bytes()), file_type="stl", force="mesh")
        mesh.merge_vertices()
        assert mesh.is_watertight

        api_calls = [(url, status, header) for url, status, header in responses if "/api/" in url]
        assert api_calls, "the page made no API calls"
        assert all(header == f"Bearer {TOKEN}" for _, _, header in api_calls), api_calls
        assert all(status < 400 for _, status, _ in api_calls), [c for c in api_calls if c[1] >= 400]
        assert any(url.endswith("/events") for url, _, _ in api_calls)  # the stream, with the token
        assert not traffic.page_errors, traffic.page_errors
    finally:
        context.close()
