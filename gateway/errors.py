"""One error shape for every REST answer: {"error": {"code", "message"}}, the message starting with the field.

- `ApiError` is what routes raise; `from_rpc_error` maps a gRPC status to one.
- Validation errors (the declared models, query, path and header parameters)
  are 400 INVALID_ARGUMENT naming the first field at fault, never FastAPI's 422.
- A 405 lists in `Allow` every method the path has, across all its routes.
- `error_responses(...)` documents an operation's error statuses, each with
  the one error model, for the OpenAPI document.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, iter_route_contexts
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import compile_path

from gateway.models.errors import ErrorBody

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

HTTP_CODES: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    412: "FAILED_PRECONDITION",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    422: "INVALID_ARGUMENT",
    426: "UPGRADE_REQUIRED",
    429: "RESOURCE_EXHAUSTED",
    507: "RESOURCE_EXHAUSTED",
}

# What each status means here, for the document.
STATUS_MEANINGS: dict[int, str] = {
    400: "A field is invalid: INVALID_ARGUMENT, the message starting with the field",
    401: "No valid bearer token (only when the gateway runs with GATEWAY_AUTH_TOKEN)",
    404: "No such job (or it expired)",
    409: "Conflicts with the job's state: its result does not exist yet, or the request_id / Idempotency-Key "
    "was used for a different request",
    412: "The backend asked for cannot serve (no weights, broken weights): FAILED_PRECONDITION with the reason; "
    "retrying does not help until an operator acts",
    413: "The upload is over the limit",
    415: "The body is neither multipart/form-data nor application/json",
    426: "This path speaks WebSocket only",
    429: "The queue is full; retry after Retry-After seconds",
    500: "An unexpected error in the gateway or a service",
    502: "A service answered with an unknown error, or ended a stream without data",
    503: "A service the answer needs is unavailable (restarting, or down); retry after Retry-After seconds",
    504: "A service did not answer in time",
    507: "The service's disk is below its reserve; retry after Retry-After seconds",
}
RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def invalid(field: str, message: str) -> ApiError:
    return ApiError(400, "INVALID_ARGUMENT", f"{field}: {message}")


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorBody.model_validate({"error": {"code": code, "message": message}})
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses` of an operation for these error statuses, each with the one error model."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": STATUS_MEANINGS[status]}
        if status in (429, 503, 507):
            entry["headers"] = {"Retry-After": RETRY_AFTER}
        if status == 426:
            entry["headers"] = {"Upgrade": {"description": "websocket", "schema": {"type": "string"}}}
        documented[status] = entry
    return documented


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    code = exc.code()
    status = HTTP_STATUS.get(code, 502 if code == grpc.StatusCode.UNKNOWN else 500)
    headers: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            headers["Retry-After"] = str(value)
    if status in (429, 503, 507) and "Retry-After" not in headers:
        # A 503 here is mostly a service restarting: the channel reconnects within two seconds.
        headers["Retry-After"] = "1"
    message = exc.details() or code.name
    if code == grpc.StatusCode.FAILED_PRECONDITION and message.startswith("backend:"):
        # The backend asked for cannot serve (no weights, broken weights, still loading): 412, a 4xx,
        # since retrying the same request does not help until an operator acts.
        status = 412
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and message.startswith("storage:"):
        # Not an overload that passes in a second: the service's disk is below its reserve.
        status = 507
    if code == grpc.StatusCode.UNAVAILABLE:
        message = f"generation service unavailable: {message}"
    return ApiError(status, code.name, message, headers)


# Where a parameter came from is not part of its name: `query.page_size` is `page_size`.
_LOCATIONS = {"body", "query", "path", "header", "cookie"}


def validation_message(errors: Sequence[Any]) -> str:
    """'field: what is wrong' for the first of Pydantic's errors."""
    if not errors:
        return "request: invalid"
    first = dict(errors[0])
    context = first.get("ctx") or {}
    loc = [str(part) for part in first.get("loc", ()) if part not in _LOCATIONS]
    field = context.get("field") or ".".join(loc) or "body"
    return f"{field}: {_describe(first)}"


def _describe(error: dict[str, Any]) -> str:
    kind, context, value = error.get("type", ""), error.get("ctx") or {}, error.get("input")
    shown = _shown(value)
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        bound = {"greater_than_equal": "at least", "less_than_equal": "at most", "greater_than": "more than",
                 "less_than": "less than"}[kind]
        limit = next(iter(v for k, v in context.items() if k in ("ge", "le", "gt", "lt")), "")
        return f"must be {bound} {limit}, got {shown}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"must be a whole number, got {shown}"
    if kind in ("float_type", "float_parsing"):
        return f"must be a number, got {shown}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind in ("bool_type", "bool_parsing"):
        return f"must be true or false, got {shown}"
    if kind == "literal_error":
        return f"must be one of {context.get('expected', '')}, got {shown}".replace("'", "")
    if kind == "string_pattern_mismatch":
        return f"must match {context.get('pattern')}, got {shown}"
    if kind == "string_too_long":
        return f"must be at most {context.get('max_length')} characters"
    if kind == "string_type":
        return f"must be a string, got {shown}"
    if kind == "model_type" or kind == "dict_type":
        return "must be a JSON object"
    if kind == "json_invalid":
        return "not valid JSON"
    return str(error.get("msg", "invalid"))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 42 else text[:40] + "…"


class ContractRoute(APIRoute):
    """A route whose validation errors are the 400 error body, wherever its router is mounted.

    Routers carry it (APIRouter(route_class=ContractRoute)), so an app that includes one without
    `install` (a test's bare FastAPI app) still answers the documented error."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return error_response(400, "INVALID_ARGUMENT", validation_message(exc.errors()))

        return handle


def allowed_methods(app: FastAPI, request: Request) -> list[str]:
    """Every method some route of this request's path serves."""
    methods: set[str] = set()
    for route in iter_route_contexts(app.routes):
        if route.methods and route.path and _path_regex(route.path).match(request.url.path):
            methods.update(route.methods)
    return sorted(methods)


@functools.cache
def _path_regex(path: str) -> re.Pattern[str]:
    regex, _, _ = compile_path(path)
    return regex


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _rpc_error(_: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        err = from_rpc_error(exc)
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "INVALID_ARGUMENT", validation_message(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "ERROR")
        message = str(exc.detail)
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 404 and message == "Not Found":
            message = f"path: no such resource: {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"method: {request.method} is not allowed on {request.url.path[:200]}"
            # Starlette names only the methods of the one route it matched; the path may have several.
            headers["Allow"] = ", ".join(allowed_methods(app, request))
        return error_response(exc.status_code, code, message, headers)
