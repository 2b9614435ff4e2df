"""One error shape for every REST answer: {"error": {"code", "message"}}."""
from __future__ import annotations

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    429: "RESOURCE_EXHAUSTED",
    507: "RESOURCE_EXHAUSTED",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def from_rpc_error(exc: grpc.aio.AioRpcError) -> ApiError:
    code = exc.code()
    status = HTTP_STATUS.get(code, 502 if code == grpc.StatusCode.UNKNOWN else 500)
    headers: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        if key == "retry-after":
            headers["Retry-After"] = str(value)
    if status in (429, 507) and "Retry-After" not in headers:
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


def install(app) -> None:  # noqa: ANN001 - FastAPI app
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(grpc.aio.AioRpcError)
    async def _rpc_error(_: Request, exc: grpc.aio.AioRpcError) -> JSONResponse:
        err = from_rpc_error(exc)
        return error_response(err.status, err.code, err.message, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        return error_response(400, "INVALID_ARGUMENT", f"{field or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = HTTP_CODES.get(exc.status_code, "ERROR")
        message = str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"path: no such resource: {request.url.path[:200]}"
        elif exc.status_code == 405:
            message = f"method: {request.method} is not allowed on {request.url.path[:200]}"
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))
