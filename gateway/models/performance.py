"""The performance and device reports (gateway/performance_routes.py), from the telemetry service.

Durations are seconds, shares fractions from 0 to 1, memory MB (MiB). The
reports grow (per-worker and per-device figures), so each model declares the
fields it has and lets further ones through: a client must ignore keys it
does not know.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Severity = Literal["info", "warning", "critical"]


class _Report(BaseModel):
    model_config = ConfigDict(extra="allow")


class StageBreakdown(_Report):
    avg_duration: float
    p50: float
    p95: float
    max: float
    share: float = Field(description="Of the pipeline's time, 0 to 1")
    count: int


class Bottleneck(_Report):
    stage: str
    share: float
    severity: Severity


class WorkerSummary(_Report):
    """One worker's share of the same profiles (a worker per device, GENERATION_DEVICES)."""

    worker_id: str
    device: str
    total_pipelines: int
    succeeded_pipelines: int
    failed_pipelines: int
    avg_duration: float
    p50_duration: float
    p95_duration: float
    avg_batch_size: float
    share: float = Field(description="Of all the pipelines summarised, 0 to 1")


class PerformanceSummary(_Report):
    backend: str = Field(description="The backend summarised; empty: all of them")
    window: Literal["all", "recent"]
    window_seconds: float
    total_pipelines: int
    succeeded_pipelines: int
    failed_pipelines: int
    avg_duration: float
    min_duration: float
    max_duration: float
    p50_duration: float
    p95_duration: float
    stage_breakdown: dict[str, StageBreakdown] = Field(description="Per stage, in pipeline order")
    bottlenecks: list[Bottleneck]
    backends: list[str] = Field(description="Every backend that has reported a profile")
    worker_id: str = Field(description="The worker summarised; empty: every worker together")
    workers: list[WorkerSummary] = Field(description="The same profiles broken down per worker")


class Recommendation(_Report):
    code: str
    severity: Severity
    message: str
    figures: dict[str, float]
    subject: str


class Recommendations(_Report):
    recommendations: list[Recommendation] = Field(description="Most severe first")


class Memory(_Report):
    total_mb: float
    used_mb: float
    free_mb: float
    utilization_percent: float


class Trends(_Report):
    trend: Literal["unknown", "stable", "rising", "falling"] = Field(description="Of memory use")
    avg_utilization: float | None
    avg_utilization_1m: float | None
    avg_utilization_5m: float | None
    avg_utilization_15m: float | None
    memory_slope_mb_per_min: float
    samples: int


class Device(_Report):
    worker_id: str
    device: str
    device_type: str
    name: str
    memory: Memory
    utilization_percent: float | None
    temperature_c: float | None
    power_w: float | None
    torch: dict[str, float] | None = Field(description="torch's own view of device memory, MB; null on the CPU")
    sampled_at: float = Field(description="Unix seconds")
    age_s: float
    stale: bool
    trends: Trends


class DeviceStatus(_Report):
    devices: list[Device]
    memory: Memory = Field(description="Over the devices that are not stale")
    trends: Trends
    recommendations: list[Recommendation]


class Cost(_Report):
    backend: str
    resolution: int
    steps: int
    per_item_mb: float
    per_item_bytes: int
    basis: str
    observations: int
    last_per_item_mb: float
    max_per_item_mb: float
    oom_floor_mb: float
    updated_at: float = Field(description="Unix seconds")


class DecisionOutcome(_Report):
    ran_size: int | None
    peak_memory_mb: float | None
    out_of_memory: bool | None


class Decision(_Report):
    id: int
    decided_at: float = Field(description="Unix seconds")
    worker_id: str
    device: str
    backend: str
    resolution: int
    steps: int
    queue_length: int
    image_width: int
    image_height: int
    available_mb: float
    per_item_mb: float
    basis: str
    size: int = Field(description="The batch size chosen")
    reasoning: str
    outcome: DecisionOutcome | None = Field(description="How the batch went, once it ran")


class OptimizerState(_Report):
    target_utilization: float
    headroom: float
    costs: list[Cost]
    decisions: list[Decision] = Field(description="Newest first")
    total_decisions: int
