"""The OpenAPI document: FastAPI's, from the routes and models, plus what it cannot infer.

- The submission's two request bodies (read by hand, for the streaming size
  limit) and the event models the SSE stream's schema names are added to the
  components.
- FastAPI's default 422 response and its HTTPValidationError model go: the
  gateway never sends them (a validation error is 400 with the one error
  model, which every operation documents).

`python -m gateway.openapi [PATH]` (`make openapi`) writes the document to
docs/openapi.json; a test fails when that file differs from what the
gateway serves.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.models.errors import ErrorBody
from gateway.models.generations import (
    GenerationFormRequest,
    GenerationJsonRequest,
    QueuedEvent,
    StageEvent,
    StreamMessage,
    TerminalEvent,
)

DOCUMENT_PATH = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
REF_TEMPLATE = "#/components/schemas/{model}"
_EXTRA_MODELS: list[tuple[type[BaseModel], Literal["validation", "serialization"]]] = [
    (GenerationJsonRequest, "validation"),
    (GenerationFormRequest, "validation"),
    (QueuedEvent, "serialization"),
    (StageEvent, "serialization"),
    (TerminalEvent, "serialization"),
    (StreamMessage, "serialization"),
    (ErrorBody, "serialization"),
]
_FASTAPI_VALIDATION_MODELS = ("HTTPValidationError", "ValidationError")


def build(app: FastAPI) -> dict[str, Any]:
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _, extra = models_json_schema(_EXTRA_MODELS, ref_template=REF_TEMPLATE)
    for name, schema in extra.get("$defs", {}).items():
        if name in schemas and schemas[name] != schema:
            raise RuntimeError(f"two different schemas named {name} in the document")
        schemas[name] = schema
    for path_item in document.get("paths", {}).values():
        for operation in path_item.values():
            operation.get("responses", {}).pop("422", None)
    for name in _FASTAPI_VALIDATION_MODELS:
        schemas.pop(name, None)
    document["components"]["schemas"] = dict(sorted(schemas.items()))
    return document


def install(app: FastAPI) -> None:
    """Serve `build(app)` at /openapi.json (built once, on the first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main() -> None:
    from gateway.app import create_app
    from services.common.config import GatewayConfig

    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DOCUMENT_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(create_app(GatewayConfig()).openapi()), encoding="utf-8")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
