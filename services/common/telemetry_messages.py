"""Records both sides of the telemetry contract build from the same fields.

A device sample is made by the generation service (device_monitor.DeviceSample)
and served back by telemetry (records.DeviceSampleRecord); both have the
fields of telemetry.proto's DeviceSample, so one conversion here serves both
without either service importing the other.
"""
from __future__ import annotations

from typing import Protocol

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb

# Optional in the proto: set only when measured, so "not measured" and 0 stay apart.
OPTIONAL_SAMPLE_FIELDS: tuple[str, ...] = (
    "utilization_percent",
    "temperature_c",
    "power_w",
    "torch_free_bytes",
    "torch_total_bytes",
    "torch_max_allocated_bytes",
)


class DeviceSampleFields(Protocol):
    """What a device sample carries, whichever side holds it."""

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


def device_sample_message(sample: DeviceSampleFields) -> tpb.DeviceSample:
    msg = tpb.DeviceSample(
        worker_id=sample.worker_id,
        device=sample.device,
        device_type=sample.device_type,
        name=sample.name,
        memory_total_bytes=sample.memory_total_bytes,
        memory_used_bytes=sample.memory_used_bytes,
        memory_free_bytes=sample.memory_free_bytes,
        sampled_at=sample.sampled_at,
    )
    for name in OPTIONAL_SAMPLE_FIELDS:
        value = getattr(sample, name)
        if value is not None:
            setattr(msg, name, value)
    return msg
