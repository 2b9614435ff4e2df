"""The one error body every REST error answer carries: {"error": {"code", "message"}}."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(
        description="The gRPC status name or HTTP reason: INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, "
        "FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE, ...; for a job's own error also a reason "
        "such as `interrupted` or `stalled`",
        examples=["INVALID_ARGUMENT"],
    )
    message: str = Field(
        description="What went wrong, starting with the field at fault",
        examples=["resolution: must be between 64 and 1024, got 5000"],
    )


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail
