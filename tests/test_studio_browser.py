"""The Studio page in a real browser (Debian's chromium under Playwright),
against the real stack: make a model from a photo, watch it, turn it, download
it, reopen it from the history, read the performance panel.

Screenshots of each state land in tests/artifacts/studio/.
"""
from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trimesh
from playwright.sync_api import Browser, Page, expect, sync_playwright

from services.stack import Stack
from tests.images import photo_png
from tests.studio_helpers import (
    DESKTOP,
    PHONE,
    Traffic,
    colour_spread,
    covered_fraction,
    fmt_count,
    fmt_percent,
    fmt_seconds,
    launch,
    new_page,
    shot,
)

STAGES = ["image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"]
FAST = {"resolution": "96", "face_count": "4000", "texture_size": "256"}
LABELS = {"resolution": "Resolution", "face_count": "Face count", "texture_size": "Texture size"}
GENERATION_TIMEOUT_MS = 90_000

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return Traffic()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.gateway_url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def desktop(browser: Browser, traffic: Traffic, stack: Stack) -> Iterator[Page]:
    context, page = new_page(browser, traffic, DESKTOP)
    page.goto(stack.gateway_url + "/")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    yield page
    context.close()


@pytest.fixture(scope="module")
def generated(desktop: Page, api: httpx.Client, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A model made through the page from a real photo: the job as the API tells it once done."""
    page = desktop
    picture = tmp_path_factory.mktemp("studio") / "astronaut.png"
    picture.write_bytes(photo_png("astronaut"))

    # Before any model the view is the bare background: the pixel check below can fail.
    assert covered_fraction(page.locator("#viewer").screenshot()) < 0.01

    page.locator("#image").set_input_files(picture)
    thumbnail = page.locator("#thumbnail")
    expect(thumbnail).to_be_visible()
    assert page.evaluate("document.querySelector('#thumbnail').naturalWidth") == 512
    for name, value in FAST.items():
        page.get_by_label(LABELS[name], exact=True).fill(value)
    shot(page, "01-picture-chosen")

    # Keyboard only: focus the button and press Enter.
    page.get_by_role("button", name="Generate").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#job-id")).not_to_have_text("")
    job_id = page.locator("#job-id").inner_text().strip()
    shot(page, "02-running")

    expect(page.locator('#stages li[data-state="completed"]')).to_have_count(5, timeout=GENERATION_TIMEOUT_MS)
    expect(page.locator("#run-status")).to_have_attribute("data-status", "succeeded")
    expect(page.locator("#viewer")).to_have_attribute("data-state", "ready", timeout=30_000)
    expect(page.locator("#viewer")).to_have_attribute("data-model", job_id)
    shot(page, "03-done")

    job = api.get(f"/api/v1/generations/{job_id}").json()
    assert job["status"] == "succeeded", job
    return job


def test_every_control_is_labelled_and_reachable_by_keyboard(desktop: Page) -> None:
    unlabelled = desktop.evaluate(
        """() => [...document.querySelectorAll('input, select, button, textarea, a[href], [tabindex="0"]')]
            .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                && !el.getAttribute('aria-labelledby') && !el.textContent.trim())
            .map((el) => el.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []

    desktop.locator("body").focus()
    reached = []
    for _ in range(40):
        desktop.keyboard.press("Tab")
        reached.append(desktop.evaluate("document.activeElement.id"))
    for control in ["image", "resolution", "steps", "face_count", "remove_background", "foreground_ratio",
                    "texture", "texture_size", "format", "seed", "submit", "viewer"]:
        assert control in reached, (control, reached)
    assert reached.index("image") < reached.index("resolution") < reached.index("submit")


def test_a_photo_goes_through_all_five_stages_with_their_times(desktop: Page, generated: dict[str, Any]) -> None:
    assert list(generated["stage_timings"]) == STAGES
    for stage in STAGES:
        row = desktop.locator(f'#stages li[data-stage="{stage}"]')
        expect(row).to_have_attribute("data-state", "completed")
        expect(row.locator(".stage-time")).to_have_text(fmt_seconds(generated["stage_timings"][stage]))
    result = generated["result"]
    expect(desktop.locator("#stat-vertices")).to_have_text(fmt_count(result["vertices"]))
    expect(desktop.locator("#stat-faces")).to_have_text(fmt_count(result["faces"]))
    expect(desktop.locator("#stat-watertight")).to_have_text("yes" if result["watertight"] else "no")


def test_the_viewer_draws_the_model(desktop: Page, generated: dict[str, Any]) -> None:
    canvas = desktop.locator("#viewer")
    front = canvas.screenshot()
    # The model fills a good part of the view and carries the photo's colours.
    assert covered_fraction(front) > 0.05
    assert colour_spread(front) > 10
    # Turning it from the keyboard redraws a different picture.
    canvas.focus()
    for _ in range(4):
        desktop.keyboard.press("ArrowRight")
    turned = canvas.screenshot()
    assert covered_fraction(turned) > 0.05
    assert turned != front


def test_a_download_reloads_as_a_mesh(
    desktop: Page, generated: dict[str, Any], api: httpx.Client, tmp_path: Path
) -> None:
    # The job wrote its own format (GLB); STL is written on its first download, then kept.
    assert set(generated["result"]["bytes"]) == {"glb"}
    for fmt in ("glb", "stl"):
        link = desktop.locator(f'#downloads a[data-format="{fmt}"]')
        expect(link).to_be_visible()
        with desktop.expect_download(timeout=20_000) as info:
            link.click()
        path = tmp_path / info.value.suggested_filename
        info.value.save_as(path)
        sizes = api.get(f"/api/v1/generations/{generated['id']}").json()["result"]["bytes"]
        assert path.stat().st_size == sizes[fmt]
        mesh = trimesh.load(io.BytesIO(path.read_bytes()), file_type=fmt, force="mesh")
        assert len(mesh.faces) == generated["result"]["faces"], fmt
        mesh.merge_vertices(merge_tex=True, merge_norm=True)
        assert mesh.is_watertight, fmt


def test_a_dropped_picture_fills_the_upload_and_shows_its_thumbnail(
    browser: Browser, traffic: Traffic, stack: Stack
) -> None:
    context, page = new_page(browser, traffic, DESKTOP)
    try:
        page.goto(stack.gateway_url + "/")
        transfer = page.evaluate_handle(
            """async (b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const transfer = new DataTransfer();
                transfer.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
                return transfer;
            }""",
            base64.b64encode(photo_png("chelsea", 64)).decode(),
        )
        page.dispatch_event("#drop-zone", "dragenter", {"dataTransfer": transfer})
        expect(page.locator("#drop-zone")).to_have_class(re.compile(r"\bdragging\b"))
        page.dispatch_event("#drop-zone", "drop", {"dataTransfer": transfer})
        expect(page.locator("#drop-zone")).not_to_have_class(re.compile(r"\bdragging\b"))
        expect(page.locator("#thumbnail")).to_be_visible()
        expect(page.locator("#thumbnail")).to_have_attribute("alt", "Thumbnail of dropped.png")
        assert page.evaluate("document.querySelector('#thumbnail').naturalWidth") == 64
        # The drop lands in the form's file input, the one the submit reads.
        assert page.evaluate("document.querySelector('#image').files[0].name") == "dropped.png"
    finally:
        context.close()


def test_a_bad_image_shows_the_api_message_beside_the_upload(
    browser: Browser, traffic: Traffic, stack: Stack, api: httpx.Client
) -> None:
    junk = b"this is not a picture, only text with a .png name"
    expected = api.post("/api/v1/generations", files={"image": ("broken.png", junk, "image/png")}, data=FAST)
    assert expected.status_code == 400, expected.text
    message = expected.json()["error"]["message"]
    assert message.startswith("image:")

    context, page = new_page(browser, traffic, DESKTOP)
    try:
        page.goto(stack.gateway_url + "/")
        page.locator("#image").set_input_files({"name": "broken.png", "mimeType": "image/png", "buffer": junk})
        for name, value in FAST.items():
            page.get_by_label(LABELS[name], exact=True).fill(value)
        page.get_by_role("button", name="Generate").click()
        error = page.locator("#image-error")
        expect(error).to_have_text(message)
        expect(page.locator("#image")).to_have_attribute("aria-invalid", "true")
        assert "image-error" in (page.locator("#image").get_attribute("aria-describedby") or "").split()
        # Beside the upload: right under the drop zone, in the same column.
        zone = page.locator("#drop-zone").bounding_box()
        box = error.bounding_box()
        assert zone and box
        assert 0 <= box["y"] - (zone["y"] + zone["height"]) < 80
        assert abs(box["x"] - zone["x"]) < 20
        expect(page.locator("#form-error")).to_be_hidden()
        expect(page.locator("#job-id")).to_have_text("")
        shot(page, "04-bad-image")
    finally:
        context.close()


def test_a_setting_out_of_range_shows_the_api_message_beside_that_field(
    browser: Browser, traffic: Traffic, stack: Stack, api: httpx.Client
) -> None:
    expected = api.post(
        "/api/v1/generations",
        files={"image": ("astronaut.png", photo_png("astronaut", 128), "image/png")},
        data={**FAST, "resolution": "5000"},
    )
    assert expected.status_code == 400, expected.text
    message = expected.json()["error"]["message"]
    assert message.startswith("resolution:")

    context, page = new_page(browser, traffic, DESKTOP)
    try:
        page.goto(stack.gateway_url + "/")
        page.locator("#image").set_input_files(
            {"name": "astronaut.png", "mimeType": "image/png", "buffer": photo_png("astronaut", 128)}
        )
        for name, value in {**FAST, "resolution": "5000"}.items():
            page.get_by_label(LABELS[name], exact=True).fill(value)
        page.get_by_role("button", name="Generate").click()
        expect(page.locator("#resolution-error")).to_have_text(message)
        expect(page.get_by_label("Resolution", exact=True)).to_be_focused()
        expect(page.locator("#image-error")).to_be_hidden()
        # Typing a new value clears the message.
        page.get_by_label("Resolution", exact=True).fill("96")
        expect(page.locator("#resolution-error")).to_be_hidden()
    finally:
        context.close()


def _panel_matches(page: Page, summary: dict[str, Any], optimizer: dict[str, Any]) -> list[str]:
    """What differs between the panel and the API's answers (empty when they agree)."""
    wrong = []

    def check(selector: str, want: str) -> None:
        got = page.locator(selector).inner_text().strip()
        if got != want:
            wrong.append(f"{selector}: page {got!r}, API {want!r}")

    check("#perf-total", fmt_count(summary["total_pipelines"]))
    check("#perf-avg", fmt_seconds(summary["avg_duration"]))
    check("#perf-p95", fmt_seconds(summary["p95_duration"]))
    for stage, stats in summary["stage_breakdown"].items():
        check(f'#perf-stages li[data-stage="{stage}"] .share-value', fmt_percent(stats["share"]))
    shown = page.locator("#perf-bottlenecks li").count()
    if shown != len(summary["bottlenecks"]):
        wrong.append(f"bottlenecks: page {shown}, API {len(summary['bottlenecks'])}")
    if optimizer["decisions"]:
        check("#perf-decisions tbody tr:first-child td:last-child", optimizer["decisions"][0]["reasoning"])
    # A row per worker (issue 11): every worker the summary breaks the profiles down by.
    shown_workers = set(page.locator("#perf-workers-table tbody tr td:first-child").all_inner_texts())
    if not {w["worker_id"] for w in summary["workers"]} <= shown_workers:
        wrong.append(f"workers: page {sorted(shown_workers)}, API {[w['worker_id'] for w in summary['workers']]}")
    return wrong


def test_the_performance_panel_shows_the_apis_numbers(
    desktop: Page, generated: dict[str, Any], api: httpx.Client
) -> None:
    summary = api.get("/api/performance/summary")
    assert summary.status_code == 200, summary.text
    # The generation above reports its profile; the panel needs at least that one.
    deadline = time.monotonic() + 15
    while summary.json()["total_pipelines"] < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        summary = api.get("/api/performance/summary")
    assert summary.json()["total_pipelines"] >= 1
    assert set(summary.json()["stage_breakdown"]) == set(STAGES)

    # It refreshes on its own, without a click.
    stamp = desktop.locator(".performance").get_attribute("data-refreshed")
    expect(desktop.locator(".performance")).not_to_have_attribute("data-refreshed", stamp or "", timeout=12_000)

    wrong: list[str] = ["not compared yet"]
    for _ in range(10):
        # The numbers move while other jobs finish: compare against two equal reads around the panel's.
        before = (api.get("/api/performance/summary").json(), api.get("/api/optimizer/state").json())
        stamp = desktop.locator(".performance").get_attribute("data-refreshed")
        desktop.get_by_role("button", name="Refresh now").click()
        expect(desktop.locator(".performance")).not_to_have_attribute("data-refreshed", stamp or "")
        after = (api.get("/api/performance/summary").json(), api.get("/api/optimizer/state").json())
        if before != after:
            continue
        wrong = _panel_matches(desktop, *after)
        if not wrong:
            break
    assert wrong == []
    expect(desktop.locator("#perf-stages svg.stacked-bar")).to_be_visible()
    expect(desktop.locator("#perf-device svg.line-chart")).to_be_visible()
    expect(desktop.locator(".performance .unavailable")).to_have_count(0)
    desktop.locator("#performance-title").evaluate("(el) => el.scrollIntoView()")
    shot(desktop, "05-performance", full_page=False)


def test_the_history_reopens_a_finished_model_on_a_phone(
    browser: Browser, traffic: Traffic, stack: Stack, generated: dict[str, Any]
) -> None:
    context, page = new_page(browser, traffic, PHONE)
    try:
        page.goto(stack.gateway_url + "/")
        row = page.locator(f'#history-rows tr[data-id="{generated["id"]}"]')
        expect(row).to_have_attribute("data-status", "succeeded")
        expect(row.locator(".badge")).to_have_text("succeeded")
        shot(page, "01-start")
        row.get_by_role("button").focus()
        page.keyboard.press("Enter")
        expect(page.locator("#job-id")).to_have_text(generated["id"])
        expect(page.locator('#stages li[data-state="completed"]')).to_have_count(5)
        expect(page.locator("#viewer")).to_have_attribute("data-model", generated["id"], timeout=30_000)
        expect(page.locator("#viewer")).to_have_attribute("data-state", "ready")
        assert covered_fraction(page.locator("#viewer").screenshot()) > 0.05
        expect(page.locator("#stat-faces")).to_have_text(fmt_count(generated["result"]["faces"]))
        # Nothing sticks out sideways at this width.
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        shot(page, "02-reopened")
        expect(page.locator(".performance")).to_have_attribute("data-refreshed", re.compile(r"^\d+$"))
        page.locator("#performance-title").evaluate("(el) => el.scrollIntoView()")
        shot(page, "03-performance", full_page=False)
    finally:
        context.close()


def test_no_request_leaves_the_origin(
    traffic: Traffic, stack: Stack, api: httpx.Client, generated: dict[str, Any]
) -> None:
    origin = stack.gateway_url
    # The browser itself refuses anything else: the page's policy names its own origin only.
    policy = api.get("/").headers["content-security-policy"]
    assert "default-src 'self'" in policy and "http" not in policy
    # The record covers the page, its modules, the stream and the model: it is worth checking.
    assert f"{origin}/static/vendor/three/build/three.module.js" in traffic.urls
    assert f"{origin}/api/v1/generations/{generated['id']}/events" in traffic.urls
    assert f"{origin}/api/v1/generations/{generated['id']}/result?format=glb" in traffic.urls
    foreign = [
        u for u in traffic.urls
        if not (u.startswith(origin + "/") or u.startswith(f"blob:{origin}/") or u.startswith("data:"))
    ]
    assert foreign == []
    assert traffic.page_errors == []
