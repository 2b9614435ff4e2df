"""GET /api/v1/backends: the shape backends, ready or not (and why), and their parameter ranges."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway import parameters as p

BackendState = Literal[p.BACKEND_STATES]  # type: ignore[valid-type]


class ParameterRangeView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    minimum: int | float
    maximum: int | float
    default: int | float
    meaning: str = Field(examples=["denoising steps"])


class BackendView(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    state: BackendState
    ready: bool
    reason: str | None = Field(description="Why it is not ready; null when ready")
    default: bool = Field(description="The backend a request without `backend` gets")
    description: str
    device: str = Field(description='"cpu", "cuda:0", ...')
    precision: str | None = Field(description='"fp32", "fp16"; null for a backend without weights')
    variant: str | None = Field(
        description='Which model the loaded weights are: hunyuan3d "standard", "turbo", "mini", "mini-turbo"; '
        "null for a backend without weights"
    )
    parameters: dict[str, ParameterRangeView] = Field(
        description="resolution, steps and, where it applies, guidance_scale: range, default and meaning"
    )


class BackendList(BaseModel):
    model_config = ConfigDict(extra="forbid")

    backends: list[BackendView]
    default: str | None
