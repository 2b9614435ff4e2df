"""The records telemetry keeps and computes, independent of protobuf and SQLite."""
from __future__ import annotations

from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass(frozen=True)
class StageRecord:
    name: str
    start_offset_s: float
    duration_s: float
    memory_peak_bytes: int = 0
    # A backend's parts of the stage, (name, seconds), in the order they ran.
    substages: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ProfileRecord:
    job_id: str
    backend: str
    worker_id: str
    device: str
    batch_size: int
    image_width: int
    image_height: int
    resolution: int
    steps: int
    face_count: int
    precision: str
    started_at: float
    total_duration_s: float
    stages: tuple[StageRecord, ...]
    succeeded: bool

    @property
    def ended_at(self) -> float:
        return self.started_at + self.total_duration_s

    @property
    def peak_memory_bytes(self) -> int:
        return max((s.memory_peak_bytes for s in self.stages), default=0)


@dataclass(frozen=True)
class DeviceSampleRecord:
    worker_id: str
    device: str
    device_type: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: float | None
    temperature_c: float | None
    power_w: float | None
    torch_free_bytes: int | None
    torch_total_bytes: int | None
    torch_max_allocated_bytes: int | None
    sampled_at: float


@dataclass(frozen=True)
class SubStageStats:
    name: str
    count: int
    avg_duration: float
    p50: float
    p95: float
    share_of_stage: float


@dataclass(frozen=True)
class StageStats:
    name: str
    count: int
    avg_duration: float
    p50: float
    p95: float
    max: float
    min: float
    share: float
    substages: tuple[SubStageStats, ...] = ()


@dataclass(frozen=True)
class Bottleneck:
    stage: str
    share: float
    severity: str  # "warning" | "critical"


@dataclass(frozen=True)
class WorkerStats:
    worker_id: str
    device: str
    total_pipelines: int
    succeeded_pipelines: int
    failed_pipelines: int
    avg_duration: float
    p50_duration: float
    p95_duration: float
    avg_batch_size: float
    share: float  # of the succeeded profiles in scope


@dataclass(frozen=True)
class Summary:
    total_pipelines: int
    succeeded_pipelines: int
    failed_pipelines: int
    avg_duration: float
    min_duration: float
    max_duration: float
    p50_duration: float
    p95_duration: float
    stage_breakdown: tuple[StageStats, ...]
    bottlenecks: tuple[Bottleneck, ...]
    workers: tuple[WorkerStats, ...] = ()

    def stage(self, name: str) -> StageStats | None:
        return next((s for s in self.stage_breakdown if s.name == name), None)


@dataclass(frozen=True)
class Recommendation:
    code: str
    severity: str  # "info" | "warning" | "critical"
    message: str
    figures: dict[str, float] = field(default_factory=dict)
    subject: str = ""


@dataclass(frozen=True)
class Trends:
    trend: str  # "unknown" | "stable" | "rising" | "falling"
    memory_slope_bytes_per_s: float
    avg_utilization_1m: float | None
    avg_utilization_5m: float | None
    avg_utilization_15m: float | None
    samples: int

    @property
    def avg_utilization(self) -> float | None:
        return self.avg_utilization_5m


@dataclass(frozen=True)
class DeviceState:
    latest: DeviceSampleRecord
    age_s: float
    stale: bool
    trends: Trends


@dataclass(frozen=True)
class CostKey:
    backend: str
    resolution: int
    steps: int


@dataclass(frozen=True)
class CostObservation:
    per_item_bytes: int
    image_pixels: int
    observed_at: float


@dataclass(frozen=True)
class OomFloor:
    floor_bytes: int
    size: int
    observed_at: float


@dataclass(frozen=True)
class CostEstimate:
    key: CostKey
    per_item_bytes: int
    basis: str  # "measured" | "measured-other-steps" | "scaled" | "default" | "oom-floor"
    detail: str  # the human half of the reasoning: "measured, 12 peaks"
    observations: int
    last_per_item_bytes: int
    max_per_item_bytes: int
    oom_floor_bytes: int
    updated_at: float


@dataclass(frozen=True)
class DecisionRecord:
    id: int
    decided_at: float
    worker_id: str
    device: str
    backend: str
    resolution: int
    steps: int
    queue_length: int
    image_width: int
    image_height: int
    available_bytes: int
    budget_bytes: int
    per_item_bytes: int
    basis: str
    memory_bound_size: int
    size: int
    reasoning: str
    ran_size: int | None = None
    peak_memory_bytes: int | None = None
    out_of_memory: bool | None = None
