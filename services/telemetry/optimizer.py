"""The batch-size optimizer: how many items fit the memory budget.

size = floor(available × target_utilization / per-item cost), capped by the
queue length and the processor's own cap, and never below 1.

The per-item cost is learned per (backend, resolution, steps) from measured
peaks (a batch's peak over its size): the maximum of the newest peaks (their
95th percentile once there are 20), times a headroom factor for what the
measurements did not see. Until a key has measurements, the cost comes from
the same backend and resolution at other steps (memory barely depends on
steps), else from the nearest measured resolution scaled up generously, else
from a conservative default. An out-of-memory error at size n with A bytes
free proves an item costs more than A / n; that floor stands until a batch of
size n or more succeeds.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from services.telemetry.aggregates import percentile
from services.telemetry.records import (
    MIB,
    CostEstimate,
    CostKey,
    CostObservation,
    DecisionRecord,
    OomFloor,
    ProfileRecord,
)
from services.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)

DEFAULT_TARGET_UTILIZATION = 0.85
# Measured peaks miss allocator fragmentation and rare larger inputs.
HEADROOM = 1.15
# Before any measurement: 2 GiB per item at 256², growing with the grid's area.
DEFAULT_PER_ITEM_BYTES_AT_256 = 2 * 1024 * MIB
MIN_DEFAULT_PER_ITEM_BYTES = 256 * MIB
# The newest peaks a key's cost is taken from, and how many make a quantile
# trustworthy (fewer: the maximum).
RECENT_OBSERVATIONS = 50
QUANTILE_MIN_OBSERVATIONS = 20
COST_QUANTILE = 0.95
# A picture larger than any measured one costs at least an RGBA float32 copy
# of its extra pixels.
BYTES_PER_EXTRA_PIXEL = 16


def default_per_item_bytes(resolution: int) -> int:
    return max(MIN_DEFAULT_PER_ITEM_BYTES, int(DEFAULT_PER_ITEM_BYTES_AT_256 * (resolution / 256) ** 2))


def _mb(n: float) -> str:
    return f"{n / MIB:.0f}"


@dataclass(frozen=True)
class BatchRequest:
    backend: str
    resolution: int
    steps: int
    queue_length: int
    free_bytes: int
    total_bytes: int = 0
    used_bytes: int = 0
    image_width: int = 0
    image_height: int = 0
    max_batch_size: int = 0
    worker_id: str = ""
    device: str = ""


@dataclass(frozen=True)
class BatchOutcome:
    backend: str
    resolution: int
    steps: int
    batch_size: int
    peak_memory_bytes: int = 0
    out_of_memory: bool = False
    available_bytes: int = 0
    image_width: int = 0
    image_height: int = 0
    duration_s: float = 0.0
    decision_id: int = 0
    worker_id: str = ""
    device: str = ""


def _base(values: Sequence[int]) -> int:
    ordered = sorted(values)
    if len(ordered) < QUANTILE_MIN_OBSERVATIONS:
        return ordered[-1]
    return int(math.ceil(percentile(ordered, COST_QUANTILE)))


class BatchOptimizer:
    def __init__(
        self,
        store: TelemetryStore,
        target_utilization: float = DEFAULT_TARGET_UTILIZATION,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {target_utilization}")
        self.store = store
        self.target_utilization = target_utilization
        self._clock = clock

    # -------------------------------------------------------------- costs

    def estimate(self, key: CostKey, image_pixels: int = 0) -> CostEstimate:
        observations = self.store.observations(key)
        recent = observations[:RECENT_OBSERVATIONS]
        measured_pixels = 0
        if recent:
            values = [o.per_item_bytes for o in recent]
            cost = math.ceil(_base(values) * HEADROOM)
            basis = "measured"
            detail = f"measured, {len(values)} peak{'s' if len(values) != 1 else ''}"
            measured_pixels = max(o.image_pixels for o in recent)
        else:
            cost, basis, detail, measured_pixels = self._borrowed(key)

        floor = self.store.oom_floor(key)
        if floor is not None and floor.floor_bytes > cost:
            cost = floor.floor_bytes
            basis = "oom-floor"
            detail = f"raised after out-of-memory at batch size {floor.size}"

        if basis.startswith("measured") or basis == "scaled":
            if measured_pixels > 0 and image_pixels > measured_pixels:
                extra = (image_pixels - measured_pixels) * BYTES_PER_EXTRA_PIXEL
                cost += extra
                detail += f", +{_mb(extra)} MB for a picture larger than any measured"

        return CostEstimate(
            key=key,
            per_item_bytes=int(cost),
            basis=basis,
            detail=detail,
            observations=len(observations),
            last_per_item_bytes=observations[0].per_item_bytes if observations else 0,
            max_per_item_bytes=max((o.per_item_bytes for o in observations), default=0),
            oom_floor_bytes=floor.floor_bytes if floor else 0,
            updated_at=max([o.observed_at for o in observations[:1]] + ([floor.observed_at] if floor else []),
                           default=0.0),
        )

    def _borrowed(self, key: CostKey) -> tuple[int, str, str, int]:
        """A cost for a key with no measurements of its own."""
        others = [k for k in self.store.cost_keys(key.backend) if k != key]
        same_res = [k for k in others if k.resolution == key.resolution]
        obs = [o for k in same_res for o in self.store.observations(k)[:RECENT_OBSERVATIONS]]
        if obs:
            steps = ", ".join(str(k.steps) for k in same_res)
            return (
                math.ceil(_base([o.per_item_bytes for o in obs]) * HEADROOM),
                "measured-other-steps",
                f"measured at {steps} steps",
                max(o.image_pixels for o in obs),
            )
        measured = [(k, self.store.observations(k)[:RECENT_OBSERVATIONS]) for k in others]
        measured = [(k, o) for k, o in measured if o]
        if measured:
            near, obs = min(measured, key=lambda m: (abs(math.log(key.resolution / m[0].resolution)), m[0].resolution))
            # Up: as a volume (the worst a grid grows); down: as an area (the
            # least it shrinks). Both err on the large side.
            exponent = 3 if key.resolution > near.resolution else 2
            factor = (key.resolution / near.resolution) ** exponent
            base = _base([o.per_item_bytes for o in obs])
            return (
                math.ceil(base * factor * HEADROOM),
                "scaled",
                f"scaled from {near.resolution}² by ({key.resolution}/{near.resolution})^{exponent}",
                max(o.image_pixels for o in obs),
            )
        return default_per_item_bytes(key.resolution), "default", "default estimate, no measurements yet", 0

    # ---------------------------------------------------------- decisions

    def recommend(self, req: BatchRequest) -> DecisionRecord:
        key = CostKey(req.backend, req.resolution, req.steps)
        est = self.estimate(key, req.image_width * req.image_height)
        per_item = max(1, est.per_item_bytes)
        budget = int(req.free_bytes * self.target_utilization)
        memory_bound = budget // per_item
        reasoning = (
            f"available {_mb(req.free_bytes)} MB, {_mb(per_item)} MB per item at {req.resolution}² "
            f"({est.detail}), target {self.target_utilization:.0%} → {memory_bound}"
        )
        size = memory_bound
        if size < 1:
            size = 1
            reasoning += "; not even one item fits the budget → 1, the batch runs alone"
        queue_cap = max(1, req.queue_length)
        if size > queue_cap:
            size = queue_cap
            reasoning += f"; queue length {req.queue_length} → {size}"
        if req.max_batch_size and size > req.max_batch_size:
            size = req.max_batch_size
            reasoning += f"; max_batch_size {req.max_batch_size} → {size}"

        decision = DecisionRecord(
            id=0,
            decided_at=self._clock(),
            worker_id=req.worker_id,
            device=req.device,
            backend=req.backend,
            resolution=req.resolution,
            steps=req.steps,
            queue_length=req.queue_length,
            image_width=req.image_width,
            image_height=req.image_height,
            available_bytes=req.free_bytes,
            budget_bytes=budget,
            per_item_bytes=per_item,
            basis=est.basis,
            memory_bound_size=memory_bound,
            size=size,
            reasoning=reasoning,
        )
        decision_id = self.store.add_decision(decision)
        log.info(
            "batch size %d: %s",
            size,
            reasoning,
            extra={
                "event": "batch_size_decision",
                "decision_id": decision_id,
                "worker_id": req.worker_id,
                "device": req.device,
                "backend": req.backend,
                "resolution": req.resolution,
                "steps": req.steps,
                "queue_length": req.queue_length,
                "available_bytes": req.free_bytes,
                "per_item_bytes": per_item,
                "basis": est.basis,
                "size": size,
                "reasoning": reasoning,
            },
        )
        return replace(decision, id=decision_id)

    # ----------------------------------------------------------- learning

    def learn_from_profile(self, profile: ProfileRecord) -> None:
        peak = profile.peak_memory_bytes
        if not profile.succeeded or peak <= 0:
            return
        key = CostKey(profile.backend, profile.resolution, profile.steps)
        self._observe(key, peak, profile.batch_size, profile.image_width * profile.image_height, "profile")

    def record_outcome(self, outcome: BatchOutcome) -> CostEstimate:
        key = CostKey(outcome.backend, outcome.resolution, outcome.steps)
        if outcome.decision_id:
            self.store.record_outcome(
                outcome.decision_id, outcome.batch_size, outcome.peak_memory_bytes, outcome.out_of_memory
            )
        if outcome.out_of_memory:
            self._raise_floor(key, outcome)
        elif outcome.peak_memory_bytes > 0:
            pixels = outcome.image_width * outcome.image_height
            self._observe(key, outcome.peak_memory_bytes, outcome.batch_size, pixels, "batch")
        after = self.estimate(key)
        log.info(
            "batch outcome for %s at %d² / %d steps: size %d, %s; per-item cost now %s MB (%s)",
            key.backend,
            key.resolution,
            key.steps,
            outcome.batch_size,
            "out of memory" if outcome.out_of_memory else f"peak {_mb(outcome.peak_memory_bytes)} MB",
            _mb(after.per_item_bytes),
            after.detail,
            extra={
                "event": "batch_outcome",
                "decision_id": outcome.decision_id,
                "out_of_memory": outcome.out_of_memory,
            },
        )
        return after

    def _observe(self, key: CostKey, peak: int, batch_size: int, pixels: int, source: str) -> None:
        now = self._clock()
        per_item = max(1, math.ceil(peak / max(1, batch_size)))
        self.store.add_observation(key, CostObservation(per_item, pixels, now), source)
        floor = self.store.oom_floor(key)
        if floor is not None and batch_size >= floor.size:
            # The size that ran out of memory has now run: the floor no longer holds.
            self.store.clear_oom_floor(key)

    def _raise_floor(self, key: CostKey, outcome: BatchOutcome) -> None:
        n = max(1, outcome.batch_size)
        if outcome.available_bytes > 0:
            floor_bytes = math.ceil(outcome.available_bytes / n)
        elif outcome.peak_memory_bytes > 0:
            floor_bytes = math.ceil(outcome.peak_memory_bytes / n)
        else:
            # Nothing measured: take the cost it was sized with to be a quarter short.
            floor_bytes = math.ceil(self.estimate(key).per_item_bytes * 1.25)
        current = self.store.oom_floor(key)
        if current is not None and current.floor_bytes >= floor_bytes:
            floor_bytes, n = current.floor_bytes, min(n, current.size)
        self.store.set_oom_floor(key, OomFloor(floor_bytes, n, self._clock()))

    # -------------------------------------------------------------- state

    def costs(self, backend: str = "") -> list[CostEstimate]:
        return [self.estimate(k) for k in self.store.cost_keys(backend)]

    def decisions(self, limit: int, backend: str = "") -> list[DecisionRecord]:
        return self.store.decisions(limit, backend)

