"""The probes: /healthz (the process is alive) and /readyz (what the services say)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Check = Literal["serving", "unavailable"]


class Health(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ok"]


class ReadinessChecks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    generation: Check
    telemetry: Check
    storage: str | None = Field(
        description='"ok", or why the generation service\'s disk is below its reserve; null when not known'
    )


class Readiness(BaseModel):
    model_config = ConfigDict(extra="forbid")

    status: Literal["ready", "degraded", "unavailable"] = Field(
        description="ready; degraded: serving, without what `degraded` lists; unavailable: the generation "
        "service does not answer (HTTP 503)"
    )
    checks: ReadinessChecks
    degraded: list[Literal["storage", "telemetry"]] = Field(description="What is missing while degraded")
    backends: dict[str, str] | None = Field(
        description='Each shape backend: "ready", or its state and why ("unavailable: HUNYUAN3D_MODEL_PATH is not '
        'set"); null when the generation service did not say'
    )
