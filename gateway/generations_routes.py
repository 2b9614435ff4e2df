"""/api/v1/generations: submit a picture, list, read, cancel, and download a job's mesh.

The generation service holds every job; each route is one gRPC call,
its answer reshaped by gateway/views.py into the declared models.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import grpc
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway import errors, views
from gateway import parameters as p
from gateway.errors import ApiError, ContractRoute, error_responses, validation_message
from gateway.models.generations import (
    Format,
    Generation,
    GenerationFormRequest,
    GenerationJsonRequest,
    GenerationPage,
    GenerationSettings,
    Status,
    SubmittedGeneration,
)
from pb.orfeas.generation.v1 import generation_pb2 as pb
from pb.orfeas.generation.v1 import generation_pb2_grpc as pb_grpc

router = APIRouter(prefix="/api/v1/generations", tags=["generations"], route_class=ContractRoute)

# Errors any call to the generation service can end in.
SERVICE_ERRORS = (401, 500, 502, 503)
FILE_HEADERS = {
    "Content-Disposition": {"description": "attachment; filename=...", "schema": {"type": "string"}},
    "ETag": {"description": "The file's SHA-256, quoted", "schema": {"type": "string"}},
}

GenerationId = Annotated[
    str, Path(alias="id", pattern=p.JOB_ID_PATTERN, description="The job's id, as the submission returned it")
]
# The media type of each format's file, as the service sends it (documented here; the test checks they agree).
CONTENT_TYPES: dict[str, str] = {"glb": "model/gltf-binary", "obj": "application/zip", "stl": "model/stl",
                                 "ply": "application/octet-stream"}
MAX_FORM_FIELD_BYTES = 1024


def stub(request: Request) -> pb_grpc.GenerationServiceStub:
    return request.app.state.generation


async def call(awaitable: Any) -> Any:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as exc:
        raise errors.from_rpc_error(exc) from None


async def read_first(call: Any) -> Any:
    """The first message of a stream, None when it ended at once; NOT_FOUND and friends become HTTP errors."""
    try:
        message = await call.read()
    except grpc.aio.AioRpcError as exc:
        raise errors.from_rpc_error(exc) from None
    return None if message is grpc.aio.EOF else message


async def first_message(call: Any) -> Any:
    """Read the first message so that NOT_FOUND and friends become HTTP errors, not a broken stream."""
    message = await read_first(call)
    if message is None:
        raise ApiError(502, "INTERNAL", "the generation service ended the stream without data")
    return message


def _links(*operations: str) -> dict[str, Any]:
    """OpenAPI links from an answer carrying a job (its `id`) to the operations on that job."""
    return {
        operation: {"operationId": operation, "parameters": {"id": "$response.body#/id"}}
        for operation in operations
    }


JOB_LINKS = _links(
    "get_generation", "cancel_generation", "follow_generation_events", "download_result",
    "generation_events_websocket",
)


def _request_body_schema() -> dict[str, Any]:
    # The body is read by hand (the size limit applies while it streams in), so FastAPI cannot infer it;
    # gateway/openapi.py adds the two models to the components.
    return {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"$ref": "#/components/schemas/GenerationFormRequest"}},
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerationJsonRequest"}},
        },
    }


@router.post(
    "",
    status_code=202,
    operation_id="submit_generation",
    summary="Submit a picture; returns the queued job",
    description="Multipart (the file field `image`, the settings as form fields) or JSON (`image_base64` and "
    "the settings). Settings left out take the service's defaults. Follow the job with `links.events`.",
    response_model=SubmittedGeneration,
    response_description="The job, queued; Location names it",
    responses={
        202: {"headers": {"Location": {"description": "The job", "schema": {"type": "string"}}}, "links": JOB_LINKS},
        **error_responses(400, 409, 412, 413, 415, 429, 507, *SERVICE_ERRORS),
    },
    openapi_extra={"requestBody": _request_body_schema()},
)
async def submit_generation(
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str,  # noqa: RUF013 - None: left out, yet the document admits no null
        Header(
            alias="Idempotency-Key",
            pattern=p.REQUEST_ID_PATTERN,
            description="The same key again returns the same job (409 if the request differs); "
            "the same as the body's request_id",
        ),
    ] = None,
) -> SubmittedGeneration:
    settings, image = await _read_submission(request, request.app.state.config.max_upload_bytes)
    request_id = settings.request_id or ""
    if idempotency_key:
        if request_id and request_id != idempotency_key:
            raise errors.invalid("request_id", "differs from the Idempotency-Key header")
        request_id = idempotency_key
    generation = await call(stub(request).SubmitGeneration(settings.grpc_request(image, request_id)))
    submitted = views.submitted(generation)
    response.headers["Location"] = submitted.links.self_
    return submitted


@router.get(
    "",
    operation_id="list_generations",
    summary="List jobs, newest first",
    response_model=GenerationPage,
    response_description="A page of jobs",
    responses=error_responses(400, *SERVICE_ERRORS),
)
async def list_generations(
    request: Request,
    page_size: Annotated[int, Query(ge=p.PAGE_SIZE.minimum, le=p.PAGE_SIZE.maximum)] = int(p.PAGE_SIZE.default or 0),
    page_token: Annotated[
        str, Query(pattern=p.PAGE_TOKEN_PATTERN, description="next_page_token of the previous page")
    ] = "",
    status: Annotated[Status, Query(description="Only jobs in this status; left out: all")] = None,
) -> GenerationPage:
    response = await call(
        stub(request).ListGenerations(
            pb.ListGenerationsRequest(
                page_size=page_size, page_token=page_token, status=p.STATUS_VALUES.get(status or "", 0)
            )
        )
    )
    return GenerationPage(
        generations=[views.generation(g) for g in response.generations],
        next_page_token=response.next_page_token or None,
    )


@router.get(
    "/{id}",
    operation_id="get_generation",
    summary="A job's status, stage, progress, parameters, timings, and result or error",
    response_model=Generation,
    response_description="The job",
    responses={200: {"links": JOB_LINKS}, **error_responses(400, 404, *SERVICE_ERRORS)},
)
async def get_generation(request: Request, generation_id: GenerationId) -> Generation:
    return views.generation(await call(stub(request).GetGeneration(pb.GetGenerationRequest(id=generation_id))))


@router.delete(
    "/{id}",
    operation_id="cancel_generation",
    summary="Cancel a job",
    description="A queued job ends cancelled at once; a running one gets `cancel_requested` and stops at its "
    "next step. A finished job is returned unchanged. The job stays readable either way.",
    response_model=Generation,
    response_description="The job, cancelled or stopping (a finished job as it was)",
    responses={200: {"links": JOB_LINKS}, **error_responses(400, 404, *SERVICE_ERRORS)},
)
async def cancel_generation(request: Request, generation_id: GenerationId) -> Generation:
    return views.generation(
        await call(stub(request).CancelGeneration(pb.CancelGenerationRequest(id=generation_id)))
    )


@router.get(
    "/{id}/result",
    operation_id="download_result",
    summary="Download the mesh",
    description=(
        "GLB, a zip of OBJ + MTL + JPEG texture, binary STL, or binary PLY. The job writes the format it asked "
        "for; any other is written on its first download, then kept. 409 until the job succeeded."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The file",
            "content": {content_type: {"schema": {"type": "string", "format": "binary"}}
                        for content_type in dict.fromkeys(CONTENT_TYPES.values())},
            "headers": FILE_HEADERS,
        },
        **error_responses(400, 404, 409, *SERVICE_ERRORS),
    },
)
async def download_result(
    request: Request,
    generation_id: GenerationId,
    format: Annotated[Format, Query(description="Left out: the format the job asked for")] = None,
) -> StreamingResponse:
    return await _file(
        stub(request).DownloadResult(
            pb.DownloadResultRequest(id=generation_id, format=p.FORMAT_VALUES.get(format or "", 0))
        )
    )


@router.get(
    "/{id}/cutout",
    operation_id="download_cutout",
    summary="What the model was given: the cut-out",
    description=(
        "The picture at its own size as a PNG whose alpha is the mask image_preprocessing chose, so a bad "
        "cut-out can be told from a bad shape. 409 until the job succeeded."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "The cut-out",
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "headers": FILE_HEADERS,
        },
        **error_responses(400, 404, 409, *SERVICE_ERRORS),
    },
)
async def download_cutout(request: Request, generation_id: GenerationId) -> StreamingResponse:
    return await _file(stub(request).DownloadCutout(pb.DownloadCutoutRequest(id=generation_id)))


async def _file(grpc_call: Any) -> StreamingResponse:
    """A file streamed from the service's chunks; the first one says what it is."""
    first = await first_message(grpc_call)

    async def body() -> AsyncIterator[bytes]:
        yield first.data
        # read() once used, the call cannot be iterated: read on to the end.
        while (chunk := await grpc_call.read()) is not grpc.aio.EOF:
            yield chunk.data

    return StreamingResponse(
        body(),
        media_type=first.content_type,
        headers={
            "Content-Disposition": f'attachment; filename="{first.filename}"',
            "Content-Length": str(first.total_bytes),
            "ETag": f'"{first.sha256}"',
        },
    )


def _too_large(max_upload_bytes: int) -> ApiError:
    return ApiError(413, "PAYLOAD_TOO_LARGE", f"image: upload over the limit of {max_upload_bytes:,} bytes")


async def _read_submission(
    request: Request, max_upload_bytes: int
) -> tuple[GenerationJsonRequest | GenerationFormRequest, bytes]:
    """The settings and the picture, validated by the request model of the body's content type."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ("multipart/form-data", "application/json"):
        raise ApiError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"body: send multipart/form-data (file field 'image') or application/json (image_base64), "
            f"not {content_type or 'no content type'}",
        )
    # Base64 is a third larger than the bytes it carries; allow for it and the other fields.
    limit = max_upload_bytes * 4 // 3 + 64 * 1024
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(max_upload_bytes)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise _too_large(max_upload_bytes)
    try:
        if content_type == "application/json":
            # Strict: JSON carries types, so "96" is not an integer and 1 is not true.
            settings: GenerationJsonRequest | GenerationFormRequest = await asyncio.to_thread(
                GenerationJsonRequest.model_validate_json, bytes(body), strict=True
            )
        else:
            settings = GenerationFormRequest.model_validate(await _form_fields(request, bytes(body)))
    except ValidationError as exc:
        raise ApiError(400, "INVALID_ARGUMENT", validation_message(exc.errors())) from None
    image = settings.picture()
    if len(image) > max_upload_bytes:
        raise ApiError(413, "PAYLOAD_TOO_LARGE", f"image: {len(image):,} bytes, over the limit of {max_upload_bytes:,}")
    if not image:
        raise errors.invalid("image", "is empty")
    return settings, image


async def _form_fields(request: Request, body: bytes) -> dict[str, Any]:
    """The form's fields for GenerationFormRequest: the picture's bytes, the rest as the strings they are."""
    # Starlette's form parser reads a cached body when there is one, so the limited read is what it parses.
    request._body = body
    try:
        # Files beyond `image` are refused below, by name; the whole body is within the limit already.
        parts = len(GenerationFormRequest.model_fields) + 1
        form = await request.form(max_files=parts, max_fields=parts, max_part_size=MAX_FORM_FIELD_BYTES)
    except StarletteHTTPException as exc:
        raise errors.invalid("body", f"malformed multipart form: {exc.detail}") from None
    if "image" not in form:
        raise errors.invalid("image", "is required: a file field named 'image'")
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if name in fields:
            raise errors.invalid(name, "is given twice")
        if name == "image" and not isinstance(value, UploadFile):
            raise errors.invalid("image", "must be a file field")
        if name in GenerationSettings.model_fields and isinstance(value, UploadFile):
            raise errors.invalid(name, "must be a text field")
        # Anything else goes to the model, which names a field it does not know.
        fields[name] = await value.read() if isinstance(value, UploadFile) else value
    return fields
