"""Hostile input at every door: each answered with 4xx / INVALID_ARGUMENT naming the
problem, no process crashes, and a good request right after succeeds."""
from __future__ import annotations

import base64

import grpc
import pytest

from pb.orfeas.generation.v1 import generation_pb2 as pb
from tests.hostile import bad_pictures, tricky_but_valid_pictures
from tests.images import disk_png
from tests.sse import read_events

FAST = {"resolution": "96", "face_count": "2000", "texture_size": "256"}
BAD = bad_pictures()


def post(http, image: bytes, data: dict | None = None, **kwargs):
    return http.post(
        "/api/v1/generations", files={"image": ("upload.bin", image, "application/octet-stream")},
        data={**FAST, **(data or {})}, **kwargs,
    )


def assert_refused(response, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message"}
    assert error["message"].startswith(f"{field}:"), error


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_picture_over_rest(http, name):
    assert_refused(post(http, BAD[name]), 400, "image")


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_picture_over_grpc(generation_stub, name):
    with pytest.raises(grpc.RpcError) as err:
        generation_stub.SubmitGeneration(pb.GenerateRequest(image=BAD[name]), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("image:")


REQUESTS = {
    # name: (how to send it, expected status, the field the message names)
    "wrong-content-type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "body"),
    "no-content-type": (dict(content=b"abc"), 415, "body"),
    "missing-image-field": (dict(data={"resolution": "128"}, files={"picture": ("a", b"1")}), 400, "image"),
    "invalid-base64": (dict(json={"image_base64": "%%%"}), 400, "image_base64"),
    "base64-of-junk": (dict(json={"image_base64": base64.b64encode(b"junk").decode()}), 400, "image"),
    "json-array": (dict(json=[1, 2, 3]), 400, "body"),
    "json-wrong-type": (dict(json={"image_base64": 12}), 400, "image_base64"),
    "resolution-too-big": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "resolution": 10**6}), 400, "resolution"),
    "empty-base64": (dict(json={"image_base64": ""}), 400, "image_base64"),
    "unicode-request-id": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "request_id": "ключ/../💥"}), 400, "request_id"),
    "overlong-request-id": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "request_id": "k" * 500}), 400, "request_id"),
    "seed-negative": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "seed": -1}), 400, "seed"),
    "huge-float": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "foreground_ratio": "1e309"}), 400, "foreground_ratio"),
    "bool-as-int": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "resolution": True}), 400, "resolution"),
    "steps-as-list": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "steps": [1]}), 400, "steps"),
    "unknown-format": (dict(json={"image_base64": base64.b64encode(disk_png()).decode(), "format": "fbx"}), 400, "format"),
}


@pytest.mark.parametrize("name", sorted(REQUESTS))
def test_bad_request_over_rest(http, name):
    kwargs, status, field = REQUESTS[name]
    response = http.post("/api/v1/generations", **kwargs)
    assert_refused(response, status, field)


@pytest.mark.parametrize(
    "path",
    ["..%2F..%2Fetc%2Fpasswd", "a" * 1000, "%F0%9F%92%A5%E2%80%AE", "ABCDEF0123456789", "%00"],
    ids=["path-like", "over-long", "unicode", "uppercase", "nul"],
)
def test_bad_ids(http, path):
    for suffix in ("", "/events", "/result"):
        response = http.get(f"/api/v1/generations/{path}{suffix}")
        if "%2F" in path:
            # Decoded, the slashes make it another path, which no route serves.
            assert_refused(response, 404, "path")
        else:
            assert_refused(response, 400, "id")
    if "%2F" not in path:
        assert_refused(http.delete(f"/api/v1/generations/{path}"), 400, "id")


def test_upload_over_the_limit(http):
    assert_refused(post(http, b"\xff\xd8" + b"\0" * (21 * 1024 * 1024)), 413, "image")


@pytest.mark.parametrize("name", sorted(tricky_but_valid_pictures()))
def test_tricky_but_valid_pictures_make_a_mesh(http, name):
    """Animated GIFs (first frame), 16-bit, CMYK and palette-with-transparency are real pictures: they succeed."""
    response = post(http, tricky_but_valid_pictures()[name])
    assert response.status_code == 202, response.text
    events = read_events(http, response.json()["links"]["events"])
    assert events[-1][0] == "succeeded", events[-1]


def test_the_service_still_serves_after_the_corpus(http, stack):
    for name in ("generation", "gateway", "telemetry"):
        assert stack.processes[name].poll() is None, f"{name} died"
    response = post(http, disk_png())
    assert response.status_code == 202
    assert read_events(http, response.json()["links"]["events"])[-1][0] == "succeeded"
