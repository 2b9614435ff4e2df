"""Request checks: each turns a protobuf message into a record or raises
InvalidArgument naming the field's path. The ranges are the ones documented in
protos/orfeas/telemetry/v1/telemetry.proto.
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from typing import Any

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.common.errors import InvalidArgument
from services.telemetry.optimizer import BatchOutcome, BatchRequest
from services.telemetry.records import DeviceSampleRecord, ProfileRecord, StageRecord

MAX_BYTES = 2**50
MAX_SECONDS = 86_400.0
MAX_BATCH = 1_024
MAX_RECORDS = 1_000
MAX_STAGES = 32
MAX_SUBSTAGES = 64
PRECISIONS = ("", "fp32", "fp16", "bf16")

_BACKEND = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_STAGE = re.compile(r"^[a-z0-9_]{1,64}$")
_DEVICE_TYPE = re.compile(r"^[a-z0-9]{1,16}$")


def _int(path: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise InvalidArgument(path, f"must be between {low:,} and {high:,}, got {value:,}")
    return int(value)


def _float(path: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidArgument(path, f"must be between {low:g} and {high:g}, got {value:g}")
    return float(value)


def _text(path: str, value: str, max_len: int, required: bool, pattern: re.Pattern[str] | None = None) -> str:
    if not value:
        if required:
            raise InvalidArgument(path, "required")
        return value
    if len(value) > max_len:
        raise InvalidArgument(path, f"must be at most {max_len} characters, got {len(value)}")
    if pattern is not None and not pattern.match(value):
        raise InvalidArgument(path, f"has characters outside {pattern.pattern}: {value!r}")
    return value


def backend(path: str, value: str, required: bool = True) -> str:
    return _text(path, value, 64, required, _BACKEND)


def resolution(path: str, value: int) -> int:
    return _int(path, value, 1, 8_192)


def steps(path: str, value: int) -> int:
    return _int(path, value, 1, 100_000)


def image_side(path: str, value: int) -> int:
    return _int(path, value, 0, 65_536)


def memory_bytes(path: str, value: int) -> int:
    return _int(path, value, 0, MAX_BYTES)


def worker_id(path: str, value: str, required: bool) -> str:
    return _text(path, value, 128, required)


def device(path: str, value: str, required: bool) -> str:
    return _text(path, value, 64, required)


def profile(path: str, msg: tpb.PipelineProfile) -> ProfileRecord:
    total = _float(f"{path}.total_duration_s", msg.total_duration_s, 0.0, MAX_SECONDS)
    started = msg.started_at
    if not math.isfinite(started) or started <= 0:
        raise InvalidArgument(f"{path}.started_at", f"must be unix seconds greater than 0, got {started:g}")
    precision = msg.precision
    if precision not in PRECISIONS:
        allowed = ", ".join(p or "(empty)" for p in PRECISIONS)
        raise InvalidArgument(f"{path}.precision", f"must be one of {allowed}, got {precision!r}")
    if len(msg.stages) > MAX_STAGES:
        raise InvalidArgument(f"{path}.stages", f"at most {MAX_STAGES} stages, got {len(msg.stages)}")
    stages: list[StageRecord] = []
    seen: set[str] = set()
    # Stage and total clocks are read at slightly different instants; allow
    # a stage to exceed the total by this much before calling it wrong.
    slack = 0.01 + total * 0.01
    for i, s in enumerate(msg.stages):
        sp = f"{path}.stages[{i}]"
        name = _text(f"{sp}.name", s.name, 64, True, _STAGE)
        if name in seen:
            raise InvalidArgument(f"{sp}.name", f"stage {name!r} appears twice")
        seen.add(name)
        duration = _float(f"{sp}.duration_s", s.duration_s, 0.0, MAX_SECONDS)
        if duration > total + slack:
            raise InvalidArgument(f"{sp}.duration_s", f"must be at most total_duration_s ({total:g}), got {duration:g}")
        stages.append(
            StageRecord(
                name=name,
                start_offset_s=_float(f"{sp}.start_offset_s", s.start_offset_s, 0.0, MAX_SECONDS),
                duration_s=duration,
                memory_peak_bytes=memory_bytes(f"{sp}.memory_peak_bytes", s.memory_peak_bytes),
            )
        )
    stages = _with_substages(path, msg, stages, slack)
    return ProfileRecord(
        job_id=_text(f"{path}.job_id", msg.job_id, 128, True),
        backend=backend(f"{path}.backend", msg.backend),
        worker_id=worker_id(f"{path}.worker_id", msg.worker_id, True),
        device=device(f"{path}.device", msg.device, True),
        batch_size=_int(f"{path}.batch_size", msg.batch_size, 1, MAX_BATCH),
        image_width=image_side(f"{path}.image_width", msg.image_width),
        image_height=image_side(f"{path}.image_height", msg.image_height),
        resolution=resolution(f"{path}.resolution", msg.resolution),
        steps=steps(f"{path}.steps", msg.steps),
        face_count=_int(f"{path}.face_count", msg.face_count, 0, 100_000_000),
        precision=precision,
        started_at=float(started),
        total_duration_s=total,
        stages=tuple(stages),
        succeeded=bool(msg.succeeded),
    )


def _with_substages(
    path: str, msg: tpb.PipelineProfile, stages: list[StageRecord], slack: float
) -> list[StageRecord]:
    """The stages with the parts a backend reported for them (each names one of the profile's stages)."""
    if len(msg.substages) > MAX_SUBSTAGES:
        raise InvalidArgument(f"{path}.substages", f"at most {MAX_SUBSTAGES}, got {len(msg.substages)}")
    by_stage = {s.name: s for s in stages}
    parts: dict[str, list[tuple[str, float]]] = {}
    for i, sub in enumerate(msg.substages):
        sp = f"{path}.substages[{i}]"
        stage = by_stage.get(sub.stage)
        if stage is None:
            raise InvalidArgument(f"{sp}.stage", f"must name one of the profile's stages, got {sub.stage!r}")
        name = _text(f"{sp}.name", sub.name, 64, True, _STAGE)
        if any(name == known for known, _ in parts.get(stage.name, ())):
            raise InvalidArgument(f"{sp}.name", f"{stage.name}.{name} appears twice")
        duration = _float(f"{sp}.duration_s", sub.duration_s, 0.0, MAX_SECONDS)
        if duration > stage.duration_s + slack:
            raise InvalidArgument(
                f"{sp}.duration_s", f"must be at most its stage's duration_s ({stage.duration_s:g}), got {duration:g}"
            )
        parts.setdefault(stage.name, []).append((name, duration))
    return [replace(s, substages=tuple(parts[s.name])) if s.name in parts else s for s in stages]


def profiles(request: tpb.ReportProfileRequest) -> list[ProfileRecord]:
    _count("profiles", len(request.profiles))
    return [profile(f"profiles[{i}]", p) for i, p in enumerate(request.profiles)]


def _optional(msg: Any, name: str) -> Any:
    return getattr(msg, name) if msg.HasField(name) else None


def device_sample(path: str, msg: tpb.DeviceSample) -> DeviceSampleRecord:
    total = memory_bytes(f"{path}.memory_total_bytes", msg.memory_total_bytes)
    used = memory_bytes(f"{path}.memory_used_bytes", msg.memory_used_bytes)
    free = memory_bytes(f"{path}.memory_free_bytes", msg.memory_free_bytes)
    for name, value in (("memory_used_bytes", used), ("memory_free_bytes", free)):
        if value > total:
            raise InvalidArgument(f"{path}.{name}", f"must be at most memory_total_bytes ({total:,}), got {value:,}")
    util = _optional(msg, "utilization_percent")
    temp = _optional(msg, "temperature_c")
    power = _optional(msg, "power_w")
    torch_values = {}
    for name in ("torch_free_bytes", "torch_total_bytes", "torch_max_allocated_bytes"):
        value = _optional(msg, name)
        torch_values[name] = None if value is None else memory_bytes(f"{path}.{name}", value)
    sampled_at = msg.sampled_at
    if not math.isfinite(sampled_at) or sampled_at <= 0:
        raise InvalidArgument(f"{path}.sampled_at", f"must be unix seconds greater than 0, got {sampled_at:g}")
    return DeviceSampleRecord(
        worker_id=worker_id(f"{path}.worker_id", msg.worker_id, True),
        device=device(f"{path}.device", msg.device, True),
        device_type=_text(f"{path}.device_type", msg.device_type, 16, True, _DEVICE_TYPE),
        name=_text(f"{path}.name", msg.name, 256, False),
        memory_total_bytes=total,
        memory_used_bytes=used,
        memory_free_bytes=free,
        utilization_percent=None if util is None else _float(f"{path}.utilization_percent", util, 0.0, 100.0),
        temperature_c=None if temp is None else _float(f"{path}.temperature_c", temp, -50.0, 200.0),
        power_w=None if power is None else _float(f"{path}.power_w", power, 0.0, 10_000.0),
        torch_free_bytes=torch_values["torch_free_bytes"],
        torch_total_bytes=torch_values["torch_total_bytes"],
        torch_max_allocated_bytes=torch_values["torch_max_allocated_bytes"],
        sampled_at=float(sampled_at),
    )


def device_samples(request: tpb.ReportDeviceSamplesRequest) -> list[DeviceSampleRecord]:
    _count("samples", len(request.samples))
    return [device_sample(f"samples[{i}]", s) for i, s in enumerate(request.samples)]


def window_seconds(value: float, default: float) -> float:
    if value == 0:
        return default
    return _float("window_seconds", value, 1.0, 30 * 86_400.0)


def _count(path: str, n: int) -> None:
    if not 1 <= n <= MAX_RECORDS:
        raise InvalidArgument(path, f"must hold 1 to {MAX_RECORDS:,} entries, got {n:,}")


def batch_request(msg: tpb.RecommendBatchSizeRequest) -> BatchRequest:
    if not msg.HasField("memory"):
        raise InvalidArgument("memory", "required: the device memory snapshot")
    total = memory_bytes("memory.total_bytes", msg.memory.total_bytes)
    free = memory_bytes("memory.free_bytes", msg.memory.free_bytes)
    used = memory_bytes("memory.used_bytes", msg.memory.used_bytes)
    if total and free > total:
        raise InvalidArgument("memory.free_bytes", f"must be at most memory.total_bytes ({total:,}), got {free:,}")
    if total and used > total:
        raise InvalidArgument("memory.used_bytes", f"must be at most memory.total_bytes ({total:,}), got {used:,}")
    return BatchRequest(
        backend=backend("backend", msg.backend),
        resolution=resolution("resolution", msg.resolution),
        steps=steps("steps", msg.steps),
        queue_length=_int("queue_length", msg.queue_length, 0, 1_000_000),
        free_bytes=free,
        total_bytes=total,
        used_bytes=used,
        image_width=image_side("image_width", msg.image_width),
        image_height=image_side("image_height", msg.image_height),
        max_batch_size=_int("max_batch_size", msg.max_batch_size, 0, MAX_BATCH),
        worker_id=worker_id("worker_id", msg.worker_id, False),
        device=device("device", msg.device, False),
    )


def batch_outcome(msg: tpb.RecordBatchOutcomeRequest) -> BatchOutcome:
    return BatchOutcome(
        backend=backend("backend", msg.backend),
        resolution=resolution("resolution", msg.resolution),
        steps=steps("steps", msg.steps),
        batch_size=_int("batch_size", msg.batch_size, 1, MAX_BATCH),
        peak_memory_bytes=memory_bytes("peak_memory_bytes", msg.peak_memory_bytes),
        out_of_memory=bool(msg.out_of_memory),
        available_bytes=memory_bytes("available_bytes", msg.available_bytes),
        image_width=image_side("image_width", msg.image_width),
        image_height=image_side("image_height", msg.image_height),
        duration_s=_float("duration_s", msg.duration_s, 0.0, MAX_SECONDS),
        decision_id=_int("decision_id", msg.decision_id, 0, 2**62),
        worker_id=worker_id("worker_id", msg.worker_id, False),
        device=device("device", msg.device, False),
    )


def decisions_limit(value: int) -> int:
    return 20 if value == 0 else _int("decisions_limit", value, 1, 1_000)
