"""Generations: the submission (JSON or multipart form), the job, a page of jobs, and the progress events.

Every range, enum, pattern and default comes from gateway/parameters.py. A
setting the client leaves out stays out of the gRPC request, so the service
applies its own default (per backend for resolution, steps and
guidance_scale); the document shows those defaults.
"""
from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from gateway import parameters as p
from gateway.models.errors import ErrorBody, ErrorDetail
from pb.orfeas.generation.v1 import generation_pb2 as pb

Format = Literal[p.FORMATS]  # type: ignore[valid-type]
BackgroundMode = Literal[p.BACKGROUND_MODES]  # type: ignore[valid-type]
BackendName = Literal[tuple(p.BACKENDS)]  # type: ignore[valid-type]
Status = Literal[p.STATUSES]  # type: ignore[valid-type]
TerminalStatus = Literal[p.TERMINAL_STATUSES]  # type: ignore[valid-type]
StageName = Literal[p.STAGE_NAMES]  # type: ignore[valid-type]
StageState = Literal[p.STAGE_STATES]  # type: ignore[valid-type]


def _whole_number(value: Any) -> Any:
    # JSON Schema counts 96.0 as an integer; strict validation alone would refuse it.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


WholeNumber = Annotated[int, BeforeValidator(_whole_number)]
FiniteNumber = Annotated[float, Field(allow_inf_nan=False)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _setting(range_: p.Range, description: str) -> Any:
    """A numeric setting the client may leave out (None: the service's default, shown in the document)."""
    extra: Any = {"default": range_.default} if range_.default is not None else _no_default
    return Field(None, ge=range_.minimum, le=range_.maximum, description=description, json_schema_extra=extra)


def _choice(default: Any, description: str) -> Any:
    return Field(None, description=description, json_schema_extra={"default": default})


def _per_backend(name: str) -> str:
    return "; ".join(
        f"{backend}: {r.meaning}, {_fmt(r.minimum)} to {_fmt(r.maximum)}, "
        f"default {_fmt(r.default)}"
        for backend, ranges in p.BACKENDS.items()
        if (r := ranges.get(name)) is not None
    )


def _common_default(name: str) -> int | float | None:
    defaults = {r.default for b in p.BACKENDS.values() if (r := b.get(name)) is not None}
    return defaults.pop() if len(defaults) == 1 else None


def _fmt(value: float | None) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def _backend_rules(schema: dict[str, Any]) -> None:
    """The per-backend ranges: once `backend` is given, one branch per backend, naming it (`const`) and the
    ranges narrower than the widest. Without `backend` the default backend's apply, which are the widest."""
    branches = []
    for backend, ranges in p.BACKENDS.items():
        properties: dict[str, Any] = {"backend": {"const": backend}}
        for name in p.BACKEND_PARAMETERS:
            r, widest = ranges.get(name), p.widest(name)
            if r is not None and (r.minimum, r.maximum) != (widest.minimum, widest.maximum):
                properties[name] = {"minimum": r.minimum, "maximum": r.maximum}
        branches.append({"properties": properties})
    schema["dependentSchemas"] = {"backend": {"anyOf": branches}}


class GenerationSettings(BaseModel):
    """The settings of a generation. All optional: one left out takes the service's default.

    The fields default to None (left out) without admitting null: a JSON null is refused like any other
    value of the wrong type."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_backend_rules)

    backend: BackendName = _choice(
        p.DEFAULT_BACKEND,
        "The shape backend (GET /api/v1/backends says which are ready). One that cannot serve, such as "
        "hunyuan3d without its weights, answers 412 FAILED_PRECONDITION saying why",
    )
    seed: WholeNumber = _setting(p.SEED, "Left out: a random seed, reported back in parameters.seed")
    resolution: WholeNumber = Field(
        None,
        ge=p.widest("resolution").minimum,
        le=p.widest("resolution").maximum,
        description=f"Per backend: {_per_backend('resolution')}",
        json_schema_extra={"default": _common_default("resolution")},
    )
    steps: WholeNumber = Field(
        None,
        ge=p.widest("steps").minimum,
        le=p.widest("steps").maximum,
        description=f"Per backend: {_per_backend('steps')}",
        json_schema_extra=_no_default,
    )
    guidance_scale: FiniteNumber = Field(
        None,
        ge=p.widest("guidance_scale").minimum,
        le=p.widest("guidance_scale").maximum,
        description=f"Per backend: {_per_backend('guidance_scale')}; checked for every backend, "
        "one without guidance ignores it and reports 0",
        json_schema_extra=_no_default,
    )
    face_count: WholeNumber = _setting(p.FACE_COUNT, "Target face count after decimation")
    texture: bool = _choice(p.TEXTURE_DEFAULT, "A UV texture (true) or vertex colours only (false)")
    texture_size: WholeNumber = _setting(p.TEXTURE_SIZE, "Texture edge in pixels")
    remove_background: BackgroundMode = _choice(
        p.DEFAULT_BACKGROUND,
        "auto: the alpha channel when the picture has a meaningful one, else segment the foreground; "
        "on: always segment; off: the alpha channel if any, else the whole picture",
    )
    foreground_ratio: FiniteNumber = _setting(
        p.FOREGROUND_RATIO, "Share of the frame the object fills after cropping"
    )
    format: Format = _choice(
        p.DEFAULT_FORMAT, "The mesh format of the result (any format can be downloaded once it succeeded)"
    )
    request_id: str = Field(
        None,
        pattern=p.REQUEST_ID_PATTERN,
        description="Your key for the request; the same key again returns the same job (409 when the request "
        "differs). The Idempotency-Key header does the same",
        json_schema_extra=_no_default,
    )
    timeout_seconds: FiniteNumber = _setting(
        p.TIMEOUT_SECONDS,
        "The job must finish within this many seconds of submission, or it fails DEADLINE_EXCEEDED; 0: no limit",
    )

    @model_validator(mode="after")
    def _within_the_backend_ranges(self) -> GenerationSettings:
        backend = self.backend or p.DEFAULT_BACKEND
        for name in p.BACKEND_PARAMETERS:
            value = getattr(self, name)
            allowed = p.backend_range(backend, name)
            if value is not None and not allowed.minimum <= value <= allowed.maximum:
                raise PydanticCustomError(
                    "backend_range",
                    "must be between {minimum} and {maximum} for the {backend} backend, got {value}",
                    {"field": name, "minimum": _fmt(allowed.minimum), "maximum": _fmt(allowed.maximum),
                     "backend": backend, "value": _fmt(value)},
                )
        return self

    def grpc_request(self, image: bytes, request_id: str) -> pb.GenerateRequest:
        """The GenerateRequest with exactly the settings the client gave (request_id: resolved by the caller)."""
        given = self.model_dump(exclude_none=True, exclude={"image", "image_base64", "request_id"})
        if "format" in given:
            given["format"] = p.FORMAT_VALUES[given["format"]]
        if "remove_background" in given:
            given["remove_background"] = p.BACKGROUND_VALUES[given["remove_background"]]
        return pb.GenerateRequest(image=image, request_id=request_id, **given)


def _base64_picture(value: Any) -> bytes:
    if not isinstance(value, str):
        raise PydanticCustomError("base64", "must be a string: the picture, base64-encoded")
    if not value:
        raise PydanticCustomError("base64", "is required (the picture, base64-encoded)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise PydanticCustomError("base64", "not valid base64") from None


def _uploaded_picture(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise PydanticCustomError("file", "a file field named 'image' is required")
    return value


PICTURE = (
    "PNG, JPEG, WebP, BMP, TIFF or GIF (first frame); at most 20 MiB encoded, at least 8 and at most 8192 "
    "pixels a side, at most 40 megapixels. Anything else is 400 `image: ...`, a larger upload 413"
)
Base64Picture = Annotated[
    bytes,
    PlainValidator(_base64_picture),
    WithJsonSchema({"type": "string", "format": "byte", "contentEncoding": "base64", "minLength": 1}),
]
UploadedPicture = Annotated[bytes, PlainValidator(_uploaded_picture), WithJsonSchema({"type": "string", "format": "binary"})]


class _Base64Image(BaseModel):
    image_base64: Base64Picture = Field(description=f"The picture, base64-encoded: {PICTURE}")


class _UploadedImage(BaseModel):
    image: UploadedPicture = Field(description=f"The picture file: {PICTURE}")


# The image comes first in each: the base it is declared on is listed last.
class GenerationJsonRequest(GenerationSettings, _Base64Image):
    """POST /api/v1/generations as application/json."""

    def picture(self) -> bytes:
        return self.image_base64


class GenerationFormRequest(GenerationSettings, _UploadedImage):
    """POST /api/v1/generations as multipart/form-data: the file field `image`, the settings as form fields."""

    def picture(self) -> bytes:
        return self.image


class Links(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    self_: str = Field(alias="self", description="This job")
    events: str = Field(description="Its progress as Server-Sent Events")
    websocket: str = Field(description="The same events over a WebSocket")
    result: str = Field(description="The mesh, once it succeeded")

    @staticmethod
    def of(job_id: str) -> Links:
        base = f"/api/v1/generations/{job_id}"
        return Links(self_=base, events=f"{base}/events", websocket=f"{base}/ws", result=f"{base}/result")


class ResolvedParameters(BaseModel):
    """The settings a job runs with: defaults filled in, the seed resolved."""

    model_config = ConfigDict(extra="forbid")

    seed: int
    resolution: int
    steps: int
    face_count: int
    texture: bool
    texture_size: int
    remove_background: BackgroundMode
    foreground_ratio: float
    format: Format
    backend: str
    guidance_scale: float = Field(description="0 for a backend without guidance")


class MeshStats(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vertices: int
    faces: int
    watertight: bool = Field(description="Every edge shared by exactly two faces (texture seams merged)")
    volume: float = Field(description="Enclosed volume in model units (the longest extent is 1)")
    extents: list[float] = Field(description="Axis-aligned extents in model units")
    bytes: dict[Format, int] = Field(description="The size of each format's file, for those the service has written")


class SubmittedGeneration(BaseModel):
    """The answer to a submission: the job as queued, and where to follow it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=p.JOB_ID_PATTERN)
    status: Status
    queue_position: int = Field(description="1-based place in the queue while queued; 0 otherwise")
    links: Links


class Generation(BaseModel):
    """A job: its status, stage and progress, the parameters it runs with, its timings, result or error."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(pattern=p.JOB_ID_PATTERN)
    status: Status
    stage: StageName | None = Field(description="The stage running now, or the last one that ran")
    progress: float = Field(ge=0, le=1, description="0 to 1 over the whole pipeline")
    queue_position: int = Field(description="1-based place in the queue while queued; 0 otherwise")
    parameters: ResolvedParameters
    stage_timings: dict[StageName, float] = Field(description="Seconds per stage run so far, in order")
    result: MeshStats | None = Field(description="Set when the job succeeded")
    error: ErrorDetail | None = Field(description="Set when the job failed or was cancelled")
    request_id: str | None
    created_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool = Field(
        description="A cancel was accepted: a running job stops at its next step and ends cancelled"
    )
    attempts: int = Field(description="How many times the job has started (a crash while it ran counts)")
    worker_id: str | None = Field(description="The worker that runs or ran it, once one took it")
    device: str | None = Field(description='The device it runs or ran on ("cpu", "cuda:1")')
    links: Links


class GenerationPage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generations: list[Generation] = Field(description="Newest first")
    next_page_token: str | None = Field(description="Pass as page_token for the next page; null on the last")


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="The job")
    sequence: int = Field(description="1, 2, 3, ... per job; the SSE id, for Last-Event-ID")
    progress: float = Field(ge=0, le=1, description="0 to 1 over the whole pipeline")
    time: datetime | None


class QueuedEvent(_Event):
    """Event `queued`: the job was accepted, or moved forward in the queue."""

    queue_position: int


class StageEvent(_Event):
    """Event `stage`: a stage started, progressed, completed or failed."""

    stage: StageName | None
    state: StageState | None
    stage_progress: float = Field(ge=0, le=1)
    elapsed_seconds: float = Field(description="Seconds in this stage so far (its total once completed)")
    detail: str | None = Field(
        description='What the stage is doing, on progress events when the backend says ("denoising step 3 of 30")'
    )


class TerminalEvent(_Event):
    """Events `succeeded`, `failed`, `cancelled`: the last event of a job."""

    status: TerminalStatus
    result: MeshStats | None
    error: ErrorDetail | None


class StreamMessage(BaseModel):
    """One WebSocket message: an event's name and data, as the SSE stream carries them."""

    event: str = Field(description="queued, stage, succeeded, failed, cancelled, or error")
    data: QueuedEvent | StageEvent | TerminalEvent | ErrorBody
