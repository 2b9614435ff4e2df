"""The REST gateway, against the real stack."""
from __future__ import annotations

import base64
import io
import time
import zipfile

import pytest
import trimesh

from tests.images import disk_png, photo_jpeg, photo_png
from tests.sse import read_events

FAST = {"resolution": "96", "face_count": "4000", "texture_size": "256"}
STAGES = ["image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"]


def submit(http, image: bytes = b"", data: dict | None = None, headers: dict | None = None):
    return http.post(
        "/api/v1/generations",
        files={"image": ("picture.png", image or disk_png(), "image/png")},
        data={**FAST, **(data or {})},
        headers=headers,
    )


def wait_done(http, job_id: str) -> dict:
    events = read_events(http, f"/api/v1/generations/{job_id}/events")
    assert events[-1][0] in ("succeeded", "failed", "cancelled")
    return http.get(f"/api/v1/generations/{job_id}").json()


def assert_error(response, status: int, code: str, field: str | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    if field:
        assert body["error"]["message"].startswith(f"{field}:"), body


def test_multipart_submit_follow_and_download_every_format(http):
    response = submit(http, photo_png("astronaut"), {"seed": "11"})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] in ("queued", "running")
    assert body["links"]["events"] == f"/api/v1/generations/{body['id']}/events"
    events = read_events(http, body["links"]["events"])
    names = [name for name, _ in events]
    assert names[-1] == "succeeded"
    completed = [d["stage"] for n, d in events if n == "stage" and d["state"] == "completed"]
    assert completed == STAGES
    job = http.get(body["links"]["self"]).json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert list(job["stage_timings"]) == STAGES
    assert job["parameters"]["seed"] == 11 and job["parameters"]["format"] == "glb"
    assert job["result"]["watertight"] is True and job["error"] is None
    # The job's own format is written as it ends; the others may be written the first time they are asked for.
    assert "glb" in job["result"]["bytes"]

    downloaded = {}
    for fmt, content_type in [
        ("glb", "model/gltf-binary"),
        ("obj", "application/zip"),
        ("stl", "model/stl"),
        ("ply", "application/octet-stream"),
    ]:
        result = http.get(f"{body['links']['result']}?format={fmt}")
        assert result.status_code == 200
        assert result.headers["content-type"] == content_type
        assert "attachment; filename=" in result.headers["content-disposition"]
        assert len(result.content) == int(result.headers["content-length"])
        downloaded[fmt] = len(result.content)
        if fmt == "obj":
            with zipfile.ZipFile(io.BytesIO(result.content)) as archive:
                names_in_zip = archive.namelist()
                assert any(n.endswith(".obj") for n in names_in_zip) and any(n.endswith(".mtl") for n in names_in_zip)
            continue
        mesh = trimesh.load(io.BytesIO(result.content), file_type=fmt, force="mesh")
        mesh.merge_vertices(merge_tex=True, merge_norm=True)
        assert mesh.is_watertight, fmt
    assert http.get(body["links"]["self"]).json()["result"]["bytes"] == downloaded


def test_json_submit_with_base64(http):
    payload = {"image_base64": base64.b64encode(photo_jpeg("coffee")).decode(), "format": "stl", "resolution": 96,
               "face_count": 4000, "texture": False}
    response = http.post("/api/v1/generations", json=payload)
    assert response.status_code == 202, response.text
    job = wait_done(http, response.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["parameters"]["texture"] is False and job["parameters"]["format"] == "stl"
    result = http.get(f"/api/v1/generations/{job['id']}/result")
    assert result.headers["content-type"] == "model/stl"


def test_late_subscriber_gets_past_events_first(http):
    job_id = submit(http).json()["id"]
    first = read_events(http, f"/api/v1/generations/{job_id}/events")
    late = read_events(http, f"/api/v1/generations/{job_id}/events")
    assert [(n, d["sequence"]) for n, d in late] == [(n, d["sequence"]) for n, d in first]
    resumed = read_events(http, f"/api/v1/generations/{job_id}/events", headers={"Last-Event-ID": "3"})
    assert [d["sequence"] for _, d in resumed] == [d["sequence"] for _, d in first if d["sequence"] > 3]


def test_websocket_carries_the_same_events(http, stack):
    import json as _json

    from websockets.sync.client import connect

    job_id = submit(http).json()["id"]
    sse = read_events(http, f"/api/v1/generations/{job_id}/events")
    received = []
    with connect(f"ws://127.0.0.1:{stack.gateway_port}/api/v1/generations/{job_id}/ws") as ws:
        for message in ws:
            received.append(_json.loads(message))
    assert [(m["event"], m["data"]["sequence"]) for m in received] == [(n, d["sequence"]) for n, d in sse]


def test_list_and_cancel(http):
    job_id = submit(http).json()["id"]
    listing = http.get("/api/v1/generations", params={"page_size": 5}).json()
    assert listing["generations"][0]["id"] == job_id
    cancelled = http.delete(f"/api/v1/generations/{job_id}")
    assert cancelled.status_code == 200
    job = wait_done(http, job_id)
    assert job["status"] in ("cancelled", "succeeded")


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"resolution": "5000"}, "resolution"),
        ({"resolution": "abc"}, "resolution"),
        ({"steps": "1.5"}, "steps"),
        ({"foreground_ratio": "2"}, "foreground_ratio"),
        ({"foreground_ratio": "nan"}, "foreground_ratio"),
        ({"format": "fbx"}, "format"),
        ({"texture": "maybe"}, "texture"),
        ({"remove_background": "sometimes"}, "remove_background"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_parameters_are_400_naming_the_field(http, data, field):
    assert_error(submit(http, data=data), 400, "INVALID_ARGUMENT", field)


def test_bad_bodies(http):
    assert_error(http.post("/api/v1/generations", content=b"hello", headers={"content-type": "text/plain"}),
                 415, "UNSUPPORTED_MEDIA_TYPE")
    assert_error(http.post("/api/v1/generations", json={"image_base64": "***not base64***"}), 400,
                 "INVALID_ARGUMENT", "image_base64")
    assert_error(http.post("/api/v1/generations", json={}), 400, "INVALID_ARGUMENT", "image_base64")
    assert_error(http.post("/api/v1/generations", content=b"{", headers={"content-type": "application/json"}),
                 400, "INVALID_ARGUMENT", "body")
    assert_error(http.post("/api/v1/generations", data={"resolution": "128"}, files={"other": ("x", b"1")}),
                 400, "INVALID_ARGUMENT", "image")
    assert_error(submit(http, b"GIF89a-but-not-really"), 400, "INVALID_ARGUMENT", "image")


def test_upload_over_the_limit_is_413(http):
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (21 * 1024 * 1024)
    assert_error(submit(http, big), 413, "PAYLOAD_TOO_LARGE", "image")


def test_unknown_ids_and_missing_results(http):
    assert_error(http.get("/api/v1/generations/" + "0" * 32), 404, "NOT_FOUND")
    assert_error(http.get("/api/v1/generations/..%2F..%2Fetc"), 404, "NOT_FOUND", "path")
    assert_error(http.get("/api/v1/generations/" + "a" * 300), 400, "INVALID_ARGUMENT", "id")
    assert_error(http.get("/api/v1/generations/" + "0" * 32 + "/events"), 404, "NOT_FOUND")
    assert_error(http.get("/api/v1/generations/" + "0" * 32 + "/result"), 404, "NOT_FOUND")
    assert_error(http.get("/api/v1/generations/abcdefgh/result?format=fbx"), 400, "INVALID_ARGUMENT", "format")


def test_idempotency_key(http):
    key = f"rest-{time.time_ns()}"
    first = submit(http, headers={"Idempotency-Key": key})
    again = submit(http, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert_error(submit(http, photo_png(), headers={"Idempotency-Key": key}), 409, "ALREADY_EXISTS")
    wait_done(http, first.json()["id"])


def test_health_and_docs(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["generation"] == "serving"
    spec = http.get("/openapi.json").json()
    assert "/api/v1/generations" in spec["paths"]
    assert http.get("/docs").status_code == 200
