"""The REST contract: the published document, the ranges it declares, the errors it documents.

- docs/openapi.json is what the gateway serves (`make openapi` rewrites it);
- the request models' ranges, enums, patterns and defaults are the ones
  generation.proto documents and the generation service checks;
- every operation documents its errors with the one error model, and the
  server answers them as documented: validation errors 400 naming the field,
  405 with the path's methods in Allow, 426 for the WebSocket over plain HTTP.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest

from gateway import parameters as p
from gateway.generations_routes import CONTENT_TYPES
from pb.orfeas.generation.v1 import generation_pb2 as pb
from tests.images import disk_png

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "protos/orfeas/generation/v1/generation.proto"
DOCUMENT = ROOT / "docs/openapi.json"
ERROR_REF = "#/components/schemas/ErrorBody"
REQUEST_MODELS = ("GenerationJsonRequest", "GenerationFormRequest")


# ------------------------------------------------------------------ the proto's documented ranges


def _field_comments(message: str) -> dict[str, str]:
    """Each field of a proto message with the comment above (and beside) it, as one line."""
    body = re.search(rf"message {message} \{{(.*?)\n\}}", PROTO.read_text(), re.DOTALL)
    assert body, message
    comments: dict[str, str] = {}
    pending: list[str] = []
    for line in body.group(1).splitlines():
        text = line.strip()
        if text.startswith("//"):
            pending.append(text[2:].strip())
            continue
        field = re.match(r"(?:optional |repeated )?[\w.]+ (\w+) = \d+;(?:\s*//\s*(.*))?", text)
        if field:
            comments[field.group(1)] = " ".join([*pending, *([field.group(2)] if field.group(2) else [])])
        pending = []
    return comments


def _number(text: str) -> int | float:
    if text == "2^63-1":
        return 2**63 - 1
    text = text.replace(",", "").rstrip(".")
    return float(text) if "." in text else int(text)


NUMBER = r"(2\^63-1|\d[\d,]*(?:\.\d+)?)"


def _range(comment: str) -> tuple[int | float, int | float]:
    found = re.search(f"{NUMBER} to {NUMBER}", comment)
    assert found, comment
    return _number(found.group(1)), _number(found.group(2))


def _default(comment: str) -> int | float:
    found = re.search(rf"[Dd]efault {NUMBER}", comment)
    assert found, comment
    return _number(found.group(1))


def proto_ranges() -> dict[str, p.Range]:
    """The shared parameters' ranges and defaults as generation.proto documents them."""
    generate = _field_comments("GenerateRequest")
    ranges = {
        name: p.Range(*_range(generate[name]), _default(generate[name]))
        for name in ("face_count", "texture_size", "foreground_ratio")
    }
    ranges["seed"] = p.Range(*_range(generate["seed"]))
    at_most = re.search(rf"At most {NUMBER}", generate["timeout_seconds"])
    assert at_most and generate["timeout_seconds"].startswith("0 (default)")
    ranges["timeout_seconds"] = p.Range(0, _number(at_most.group(1)), 0)
    page_size = _field_comments("ListGenerationsRequest")["page_size"]
    ranges["page_size"] = p.Range(*_range(page_size), _default(page_size))
    return ranges


def proto_backend_ranges() -> dict[str, dict[str, p.Range | None]]:
    """resolution, steps and guidance_scale per backend, as the GenerateRequest comment lists them."""
    comment = _field_comments("GenerateRequest")["resolution"]
    backends: dict[str, dict[str, p.Range | None]] = {}
    for block in re.finditer(r"(\w+):\s+resolution is (.*?)(?=\s\w+:\s+resolution is|$)", comment):
        name, text = block.group(1), block.group(2)
        resolution, steps, guidance = re.split(r"; ", text)[:3]
        backends[name] = {
            "resolution": p.Range(*_range(resolution), _default(resolution)),
            "steps": p.Range(*_range(steps), _default(steps)),
            "guidance_scale": None if "does not apply" in guidance else p.Range(*_range(guidance), _default(guidance)),
        }
    return backends


def proto_request_id_pattern() -> str:
    found = re.search(r"at most (\d+) characters of \[([^\]]+)\]", _field_comments("GenerateRequest")["request_id"])
    assert found
    return rf"^[{found.group(2)}]{{1,{found.group(1)}}}$"


def _same(a: p.Range | None, b: p.Range | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.minimum, a.maximum, a.default) == (b.minimum, b.maximum, b.default)


# ------------------------------------------------------------------ ranges: declared once, checked twice


def test_the_declared_ranges_are_the_protos() -> None:
    documented = proto_ranges()
    declared = {"face_count": p.FACE_COUNT, "texture_size": p.TEXTURE_SIZE, "foreground_ratio": p.FOREGROUND_RATIO,
                "seed": p.SEED, "timeout_seconds": p.TIMEOUT_SECONDS, "page_size": p.PAGE_SIZE}
    for name, documented_range in documented.items():
        assert _same(declared[name], documented_range), (name, declared[name], documented_range)
    backends = proto_backend_ranges()
    assert set(backends) == set(p.BACKENDS)
    for backend, ranges in backends.items():
        for name, documented_range in ranges.items():
            assert _same(p.BACKENDS[backend].get(name), documented_range), (backend, name)
    assert p.REQUEST_ID_PATTERN == proto_request_id_pattern()
    # A request without `backend` gets the default's ranges; the document states those as the widest.
    for name in p.BACKEND_PARAMETERS:
        default, widest = p.backend_range(p.DEFAULT_BACKEND, name), p.widest(name)
        assert (default.minimum, default.maximum) == (widest.minimum, widest.maximum), name
    assert "texture on (default)" in _field_comments("GenerateRequest")["texture"] and p.TEXTURE_DEFAULT is True
    assert "(the default when empty" in _field_comments("GenerateRequest")["backend"]
    assert p.DEFAULT_BACKEND == "inflate"


def test_the_declared_ranges_are_the_services() -> None:
    """The generation service checks the same numbers (services/generation/pipeline/params.py)."""
    from services.generation import artifacts, servicer
    from services.generation.pipeline import params

    assert {name: (r.minimum, r.maximum) for name, r in (
        ("seed", p.SEED), ("face_count", p.FACE_COUNT), ("texture_size", p.TEXTURE_SIZE),
        ("foreground_ratio", p.FOREGROUND_RATIO),
    )} == params.RANGES
    assert set(params.BACKEND_PARAMETERS) == set(p.BACKENDS)
    for backend, spec in params.BACKEND_PARAMETERS.items():
        for name in p.BACKEND_PARAMETERS:
            theirs = getattr(spec, name)
            ours = p.BACKENDS[backend].get(name)
            assert (theirs is None) == (ours is None), (backend, name)
            if theirs is not None and ours is not None:
                assert (theirs.minimum, theirs.maximum, theirs.default) == (ours.minimum, ours.maximum, ours.default)
    defaults = params.GenerationParams()
    assert (defaults.face_count, defaults.texture_size, defaults.foreground_ratio, defaults.texture) == (
        p.FACE_COUNT.default, p.TEXTURE_SIZE.default, p.FOREGROUND_RATIO.default, p.TEXTURE_DEFAULT)
    assert (defaults.format, defaults.remove_background, defaults.backend) == (
        p.DEFAULT_FORMAT, p.DEFAULT_BACKGROUND, p.DEFAULT_BACKEND)
    assert params.FORMATS == p.FORMATS and params.BACKGROUND_MODES == p.BACKGROUND_MODES
    assert params.REQUEST_ID_PATTERN.pattern == p.REQUEST_ID_PATTERN
    assert artifacts.JOB_ID_PATTERN.pattern == p.JOB_ID_PATTERN
    assert artifacts.CONTENT_TYPES == CONTENT_TYPES
    assert servicer.MAX_TIMEOUT_S == p.TIMEOUT_SECONDS.maximum


def test_the_enums_are_the_protos() -> None:
    def names(enum: Any, prefix: str) -> tuple[str, ...]:
        return tuple(v.name.removeprefix(prefix).lower() for v in enum.DESCRIPTOR.values if v.number)

    assert p.FORMATS == names(pb.MeshFormat, "MESH_FORMAT_") == ("glb", "obj", "stl", "ply")
    assert p.BACKGROUND_MODES == names(pb.BackgroundRemoval, "BACKGROUND_REMOVAL_") == ("auto", "on", "off")
    assert p.STATUSES == names(pb.JobStatus, "JOB_STATUS_")
    assert p.STAGE_STATES == names(pb.StageState, "STAGE_STATE_")


# ------------------------------------------------------------------ the served document


@pytest.fixture(scope="module")
def document(http) -> dict[str, Any]:
    response = http.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def test_the_committed_document_is_what_the_gateway_serves(document) -> None:
    committed = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    assert committed == document, "docs/openapi.json is out of date: run `make openapi` and commit it"


def test_the_document_declares_the_protos_ranges(document) -> None:
    schemas = document["components"]["schemas"]
    expected = {name: r for name, r in proto_ranges().items() if name != "page_size"}
    backends = proto_backend_ranges()
    for name in p.BACKEND_PARAMETERS:
        ranges = [r for b in backends.values() if (r := b[name]) is not None]
        # One default only when every backend has the same; else each backend's is in the description.
        defaults = {r.default if r else None for r in (b[name] for b in backends.values())}
        expected[name] = p.Range(min(r.minimum for r in ranges), max(r.maximum for r in ranges),
                                 defaults.pop() if len(defaults) == 1 else None)
    for model in REQUEST_MODELS:
        properties = schemas[model]["properties"]
        for name, documented_range in expected.items():
            field = properties[name]
            assert (field["minimum"], field["maximum"], field.get("default")) == (
                documented_range.minimum, documented_range.maximum, documented_range.default), (model, name)
        assert properties["request_id"]["pattern"] == proto_request_id_pattern()
        assert properties["format"]["enum"] == list(p.FORMATS)
        assert properties["remove_background"]["enum"] == list(p.BACKGROUND_MODES)
        assert properties["backend"]["enum"] == list(backends)
        # Once `backend` is given, one branch per backend: its name, and the ranges narrower than the widest.
        rules = schemas[model]["dependentSchemas"]["backend"]["anyOf"]
        branches = {b["properties"]["backend"]["const"]: b for b in rules}
        assert set(branches) == set(backends)
        for backend, ranges in backends.items():
            for name, r in ranges.items():
                narrowed = branches[backend]["properties"].get(name)
                if r is not None and (r.minimum, r.maximum) != (expected[name].minimum, expected[name].maximum):
                    assert narrowed == {"minimum": r.minimum, "maximum": r.maximum}, (backend, name)
                else:
                    assert narrowed is None, (backend, name)
    page_size = next(q for q in document["paths"]["/api/v1/generations"]["get"]["parameters"]
                     if q["name"] == "page_size")["schema"]
    documented_page = proto_ranges()["page_size"]
    assert (page_size["minimum"], page_size["maximum"], page_size["default"]) == (
        documented_page.minimum, documented_page.maximum, documented_page.default)


def test_every_operation_documents_its_errors_with_the_one_model(document) -> None:
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            statuses = operation["responses"]
            assert "422" not in statuses, (method, path)
            errors = [s for s in statuses if s[0] in "45"]
            if path.startswith("/api/"):
                assert "401" in errors, (method, path, errors)  # with GATEWAY_AUTH_TOKEN set
            if operation.get("parameters") or operation.get("requestBody"):
                assert "400" in errors, (method, path, errors)
            for status in errors:
                if (path, status) == ("/readyz", "503"):
                    continue  # the readiness report itself, saying what is down
                schema = statuses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": ERROR_REF}, (method, path, status)


def test_streams_are_documented_as_such(document) -> None:
    events = document["paths"]["/api/v1/generations/{id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    kinds = {tuple(branch["properties"]["event"]["enum"]): branch["properties"]["data"]["contentSchema"]["$ref"]
             for branch in events["text/event-stream"]["schema"]["oneOf"]}
    assert kinds == {
        ("queued",): "#/components/schemas/QueuedEvent",
        ("stage",): "#/components/schemas/StageEvent",
        ("succeeded", "failed", "cancelled"): "#/components/schemas/TerminalEvent",
        ("error",): ERROR_REF,
    }
    websocket = document["paths"]["/api/v1/generations/{id}/ws"]["get"]
    assert "WebSocket" in websocket["summary"] and "426" in websocket["responses"]


# ------------------------------------------------------------------ the server answers as documented


def _error(response, status: int, field: str) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["message"].startswith(f"{field}:"), body
    return body["error"]


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "field"),
    [
        ("GET", "/api/v1/generations", {"params": {"page_size": 0}}, "page_size"),
        ("GET", "/api/v1/generations", {"params": {"status": "done"}}, "status"),
        ("GET", "/api/v1/generations", {"params": {"page_token": "not a token"}}, "page_token"),
        ("GET", "/api/v1/generations/NOT-AN-ID", {}, "id"),
        ("GET", "/api/v1/generations/0123456789abcdef/result", {"params": {"format": "fbx"}}, "format"),
        ("POST", "/api/v1/generations", {"headers": {"Idempotency-Key": "no spaces"}, "json": {}}, "Idempotency-Key"),
        ("POST", "/api/v1/generations", {"json": {"image_base64": "aGk=", "steps": "30"}}, "steps"),
        ("POST", "/api/v1/generations", {"json": {"image_base64": "aGk=", "resolution": None}}, "resolution"),
        ("POST", "/api/v1/generations", {"json": {"image_base64": "aGk=", "texture": "true"}}, "texture"),
        ("POST", "/api/v1/generations", {"json": {"image_base64": "aGk=", "backend": "hunyuan3d", "steps": 300}},
         "steps"),
        ("POST", "/api/v1/generations", {"files": {"image": ("a.png", b"x")}, "data": {"guidance_scale": "21"}},
         "guidance_scale"),
        ("POST", "/api/v1/generations", {"files": {"image": ("a.png", b"x"), "seed": ("s", b"1")}}, "seed"),
        ("GET", "/api/performance/summary", {"params": {"window": "forever"}}, "window"),
        ("GET", "/api/optimizer/state", {"params": {"limit": 0}}, "limit"),
        ("GET", "/api/gpu/status", {"params": {"worker_id": "w" * 129}}, "worker_id"),
    ],
)
def test_a_value_outside_the_document_is_400_naming_the_field(http, method, path, kwargs, field) -> None:
    error = _error(http.request(method, path, **kwargs), 400, field)
    assert error["code"] == "INVALID_ARGUMENT"


def test_json_is_strict_about_types_and_the_form_reads_text(http) -> None:
    picture = base64.b64encode(disk_png(64)).decode()
    # 96.0 is an integer to JSON Schema; "96" is not.
    ok = http.post("/api/v1/generations", json={"image_base64": picture, "resolution": 96.0, "face_count": 2000,
                                                 "texture": False})
    assert ok.status_code == 202, ok.text
    form = http.post("/api/v1/generations", files={"image": ("d.png", disk_png(64))},
                     data={"resolution": "96", "face_count": "2000", "texture": "false"})
    assert form.status_code == 202, form.text
    for job in (ok.json(), form.json()):
        http.delete(job["links"]["self"])


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("OPTIONS", "/api/v1/generations/0123456789abcdef", "DELETE, GET"),
        ("PUT", "/api/v1/generations/0123456789abcdef", "DELETE, GET"),
        ("PATCH", "/api/v1/generations", "GET, POST"),
        ("POST", "/healthz", "GET"),
    ],
)
def test_405_allows_every_method_of_the_path(http, method, path, allowed) -> None:
    response = http.request(method, path)
    _error(response, 405, "method")
    assert response.headers["allow"] == allowed


def test_the_websocket_path_over_plain_http_is_426(http) -> None:
    response = http.get("/api/v1/generations/0123456789abcdef/ws")
    assert _error(response, 426, "upgrade")["code"] == "UPGRADE_REQUIRED"
    assert response.headers["upgrade"] == "websocket"


def test_resuming_after_the_last_event_is_an_empty_stream(http) -> None:
    from tests.sse import read_events

    job = http.post("/api/v1/generations", files={"image": ("d.png", disk_png(64))},
                    data={"resolution": "64", "face_count": "1000", "texture": "false"}).json()
    events = read_events(http, job["links"]["events"])
    last = events[-1][1]["sequence"]
    assert read_events(http, job["links"]["events"], headers={"Last-Event-ID": str(last)}) == []
