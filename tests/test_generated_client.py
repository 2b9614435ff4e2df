"""A client generated from the live /openapi.json drives the whole job life-cycle, as a user's team would.

openapi-python-client (PyPI) writes the client into a temporary directory;
the test imports it and, with `raise_on_unexpected_status` on (a status the
document does not list would raise), submits a picture, polls the job to its
end, lists it, downloads its GLB, cancels a queued job, and meets a 404 and
400s, each decoded into the documented error model.
"""
from __future__ import annotations

import base64
import importlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trimesh

from tests.images import disk_png, photo_png

GENERATOR = str(Path(sys.executable).parent / "openapi-python-client")
PACKAGE = "orfeas_rest_client"
TERMINAL = ("succeeded", "failed", "cancelled")
FAST = {"resolution": 96, "face_count": 4000, "texture_size": 256}
MAX_JOBS_AHEAD = 6
QUEUED_FOR_S = 1.0


@pytest.fixture(scope="module")
def api(stack, tmp_path_factory) -> Iterator[ModuleType]:
    """The generated package, imported from where the generator wrote it."""
    where = tmp_path_factory.mktemp("generated")
    config = where / "config.yaml"
    # No post hooks: the generator would otherwise run ruff over its output, which changes nothing it needs.
    # A PNG (the cut-out) is a file like any other to this generator, which knows octet-stream files only:
    # its own content_type_overrides setting says so, as a team generating the client would.
    config.write_text(
        f"post_hooks: []\npackage_name_override: {PACKAGE}\n"
        "content_type_overrides:\n  image/png: application/octet-stream\n"
    )
    result = subprocess.run(
        [GENERATOR, "generate", "--url", f"{stack.gateway_url}/openapi.json", "--meta", "none",
         "--output-path", str(where / PACKAGE), "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    sys.path.insert(0, str(where))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(where))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def client(api, stack) -> Iterator[Any]:
    with api.Client(base_url=stack.gateway_url, timeout=60.0, raise_on_unexpected_status=True) as client:
        yield client


def _module(api: ModuleType, name: str) -> ModuleType:
    return importlib.import_module(f"{api.__name__}.{name}")


def _form(api: ModuleType, picture: bytes, **settings: Any) -> Any:
    models, types = _module(api, "models"), _module(api, "types")
    return models.GenerationFormRequest(
        image=types.File(payload=io.BytesIO(picture), file_name="picture.png", mime_type="image/png"), **settings
    )


def _wait(api: ModuleType, client: Any, job_id: str, timeout_s: float = 120.0) -> Any:
    get = _module(api, "api.generations.get_generation")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = get.sync(job_id, client=client)
        assert isinstance(job, _module(api, "models").Generation), job
        if job.status.value in TERMINAL:
            return job
        time.sleep(0.3)
    raise AssertionError(f"{job_id} did not end within {timeout_s:.0f}s")


def _stays_queued(get: ModuleType, client: Any, job_id: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if get.sync(job_id, client=client).status.value != "queued":
            return False
        time.sleep(0.1)
    return True


def _assert_error(api: ModuleType, response: Any, status: int, code: str, field: str | None = None) -> None:
    """The answer's status is documented and its body decodes into the one error model."""
    assert response.status_code == status, response.content
    error_body = _module(api, "models").ErrorBody
    assert isinstance(response.parsed, error_body), response.parsed
    assert response.parsed.error.code == code
    if field:
        assert response.parsed.error.message.startswith(f"{field}:"), response.parsed.error.message


def test_the_whole_life_cycle_through_the_generated_client(api, client) -> None:
    models = _module(api, "models")
    submit = _module(api, "api.generations.submit_generation")
    listing = _module(api, "api.generations.list_generations")
    download = _module(api, "api.generations.download_result")

    response = submit.sync_detailed(client=client, body=_form(api, photo_png("astronaut", 256), seed=7, **FAST))
    assert response.status_code == 202, response.content
    submitted = response.parsed
    assert isinstance(submitted, models.SubmittedGeneration)
    assert response.headers["location"] == submitted.links.self_ == f"/api/v1/generations/{submitted.id}"

    job = _wait(api, client, submitted.id)
    assert job.status.value == "succeeded", job.error
    assert job.progress == 1.0 and job.parameters.seed == 7 and job.parameters.resolution == 96
    assert job.result.watertight is True and job.attempts == 1 and job.cancel_requested is False
    assert job.worker_id and job.device and job.created_at <= job.started_at <= job.finished_at
    assert list(job.stage_timings.to_dict()) == [
        "image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export",
    ]

    page = listing.sync(client=client, page_size=100, status=models.ListGenerationsStatus.SUCCEEDED)
    assert isinstance(page, models.GenerationPage)
    assert submitted.id in [g.id for g in page.generations]

    glb = download.sync_detailed(submitted.id, client=client, format_=models.DownloadResultFormat.GLB)
    assert glb.status_code == 200 and glb.headers["content-type"] == "model/gltf-binary"
    payload = glb.parsed.payload.read()
    assert len(payload) == job.result.bytes_["glb"]
    assert len(trimesh.load(io.BytesIO(payload), file_type="glb", force="mesh").faces) > 100


def test_cancel_a_queued_job(api, client) -> None:
    models = _module(api, "models")
    submit = _module(api, "api.generations.submit_generation")
    get = _module(api, "api.generations.get_generation")
    cancel = _module(api, "api.generations.cancel_generation")
    # Heavy jobs occupy the worker and the slots it prepares ahead; the first one still queued after a
    # second, while those run, is waiting its turn. On a busy machine the worker may still claim it between
    # that look and the cancel: a job that had started is no test of a queued cancel, so try the next one.
    ahead: list[Any] = []
    for _ in range(MAX_JOBS_AHEAD):
        job = submit.sync(client=client, body=models.GenerationJsonRequest(image_base64=base64.b64encode(
            disk_png()).decode(), resolution=1024, face_count=500_000, texture_size=4096))
        assert isinstance(job, models.SubmittedGeneration), job
        ahead.append(job)
        if len(ahead) == 1 or not _stays_queued(get, client, job.id, QUEUED_FOR_S):
            continue
        cancelled = cancel.sync(job.id, client=client)
        assert isinstance(cancelled, models.Generation)
        if cancelled.started_at is None:
            break
    else:
        pytest.fail(f"no job waited in the queue behind {MAX_JOBS_AHEAD - 1} others")
    ahead.remove(job)

    # A queued job ends cancelled at once; it never started.
    assert cancelled.status.value == "cancelled", cancelled
    final = _wait(api, client, job.id)
    assert final.status.value == "cancelled" and final.result is None and final.error.code
    for other in ahead:
        cancel.sync(other.id, client=client)
    for other in ahead:
        _wait(api, client, other.id)


def test_errors_decode_into_the_documented_model(api, client) -> None:
    models = _module(api, "models")
    get = _module(api, "api.generations.get_generation")
    submit = _module(api, "api.generations.submit_generation")
    download = _module(api, "api.generations.download_result")

    _assert_error(api, get.sync_detailed("0" * 32, client=client), 404, "NOT_FOUND")
    _assert_error(api, get.sync_detailed("Not-An-Id", client=client), 400, "INVALID_ARGUMENT", "id")
    # Within the widest range, outside hunyuan3d's: the per-backend rule, refused by the gateway.
    refused = submit.sync_detailed(client=client, body=_form(
        api, disk_png(), backend=models.GenerationFormRequestBackend.HUNYUAN3D, steps=300))
    _assert_error(api, refused, 400, "INVALID_ARGUMENT", "steps")
    _assert_error(api, submit.sync_detailed(client=client, body=_form(api, b"not a picture")),
                  400, "INVALID_ARGUMENT", "image")
    # A result asked for before it exists: 409, also documented.
    pending = submit.sync(client=client, body=_form(api, disk_png(), resolution=512, face_count=200_000))
    early = download.sync_detailed(pending.id, client=client)
    if early.status_code != 200:  # the job might, just, have finished already
        _assert_error(api, early, 409, "FAILED_PRECONDITION")
    _module(api, "api.generations.cancel_generation").sync(pending.id, client=client)
