"""Which devices the service computes on: one batch worker per entry of GENERATION_DEVICES.

    GENERATION_DEVICES=cuda:0,cuda:1   two GPUs, one worker each
    GENERATION_DEVICES=cpu,cpu         two workers sharing the CPU
    (unset)                            every CUDA device torch sees, else the CPU

A worker's id names its service instance and its device ("host:50051/cuda:1"),
with "#n" when a device is listed more than once ("host:50051/cpu#0",
"host:50051/cpu#1"), so telemetry can tell workers apart and still see which
of them share a device: everything before the last "/" is the instance.

Workers on the same device share its loaded backends (the weights load once per
device) and split its memory budget; each keeps its own out-of-memory ceiling.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.common.errors import FailedPrecondition
from services.generation.backends.registry import LOADING, READY, UNAVAILABLE, BackendSet, BackendStatus

MIB = 2**20


class DeviceConfigError(ValueError):
    """GENERATION_DEVICES (or a setting given per device) names something this machine cannot serve."""


@dataclass(frozen=True)
class WorkerSlot:
    """One batch worker: where it computes and what it is called."""

    index: int  # its position in GENERATION_DEVICES
    device: torch.device
    worker_id: str
    # Workers on this same device, itself included: its memory budget is split between them.
    sharing: int
    # An injected capacity (GENERATION_MEMORY_LIMIT_MB) for this worker; 0: none.
    memory_limit_bytes: int

    @property
    def device_name(self) -> str:
        return device_name(self.device)


def device_name(device: torch.device) -> str:
    """"cpu" or "cuda:N": the name metrics, telemetry and job statuses use."""
    if device.type == "cuda":
        return f"cuda:{device.index or 0}"
    return device.type


def parse_devices(spec: str, cuda_count: int) -> list[torch.device]:
    """The devices of a GENERATION_DEVICES value, checked against the CUDA devices torch sees."""
    if not spec.strip():
        return [torch.device(f"cuda:{i}") for i in range(cuda_count)] or [torch.device("cpu")]
    devices = []
    for position, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip().lower()
        if not entry:
            raise DeviceConfigError(f"GENERATION_DEVICES: entry {position} of {spec!r} is empty")
        devices.append(_parse_one(entry, cuda_count))
    return devices


def _parse_one(entry: str, cuda_count: int) -> torch.device:
    if entry == "cpu":
        return torch.device("cpu")
    kind, colon, index_text = entry.partition(":")
    if kind != "cuda" or (colon and not index_text.isdigit()):
        raise DeviceConfigError(f"GENERATION_DEVICES: unknown device {entry!r} (expected cpu, cuda or cuda:N)")
    index = int(index_text) if colon else 0
    if cuda_count == 0:
        raise DeviceConfigError(f"GENERATION_DEVICES: {entry} asked for, but torch sees no CUDA device here")
    if index >= cuda_count:
        raise DeviceConfigError(
            f"GENERATION_DEVICES: cuda:{index} is out of range: torch sees {cuda_count} CUDA "
            f"device{'s' if cuda_count != 1 else ''} (cuda:0 to cuda:{cuda_count - 1})"
        )
    return torch.device(f"cuda:{index}")


def parse_memory_limits(spec: str, workers: int) -> list[int]:
    """GENERATION_MEMORY_LIMIT_MB in bytes per worker: one value for all, or one per device entry."""
    parts = [p.strip() for p in (spec or "0").split(",")]
    values = []
    for part in parts:
        try:
            mb = int(part)
        except ValueError:
            raise DeviceConfigError(f"GENERATION_MEMORY_LIMIT_MB: {part!r} is not a whole number of MiB") from None
        if mb < 0:
            raise DeviceConfigError(f"GENERATION_MEMORY_LIMIT_MB: must be 0 or more, got {mb}")
        values.append(mb * MIB)
    if len(values) == 1:
        return values * workers
    if len(values) != workers:
        raise DeviceConfigError(
            f"GENERATION_MEMORY_LIMIT_MB: {len(values)} values for {workers} devices; give one value, or one per device"
        )
    return values


def plan_workers(devices: Sequence[torch.device], instance: str, memory_limits: Sequence[int]) -> list[WorkerSlot]:
    """One slot per device entry, with an id unique in the process."""
    names = [device_name(d) for d in devices]
    counts = Counter(names)
    seen: Counter[str] = Counter()
    slots = []
    for index, (device, name) in enumerate(zip(devices, names)):
        suffix = f"#{seen[name]}" if counts[name] > 1 else ""
        seen[name] += 1
        slots.append(
            WorkerSlot(
                index=index,
                device=device,
                worker_id=f"{instance}/{name}{suffix}",
                sharing=counts[name],
                memory_limit_bytes=memory_limits[index],
            )
        )
    return slots


def resolve_workers(devices_spec: str, memory_limit_spec: str, instance: str) -> list[WorkerSlot]:
    """The workers GENERATION_DEVICES asks for on this machine; DeviceConfigError says what is wrong."""
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    devices = parse_devices(devices_spec, cuda_count)
    return plan_workers(devices, instance, parse_memory_limits(memory_limit_spec, len(devices)))


# ---------------------------------------------------------------- backends


_WORST_FIRST = (UNAVAILABLE, LOADING, READY)


class DeviceBackends:
    """The backends of every device, as the servicer sees them: one answer per backend.

    A job may run on any worker, so a backend serves only when it serves on every
    device; the reason names the device that holds it back.
    """

    def __init__(self, sets: dict[str, BackendSet]) -> None:
        if not sets:
            raise ValueError("at least one device's backends are needed")
        self.sets = sets

    def require_ready(self, name: str, loading_is_fine: bool = False) -> None:
        for device, backends in self.sets.items():
            try:
                backends.require_ready(name, loading_is_fine=loading_is_fine)
            except FailedPrecondition as exc:
                if len(self.sets) == 1:
                    raise
                raise FailedPrecondition(f"{exc.message} (on {device})") from None

    def loading(self, name: str) -> bool:
        return any(backends.loading(name) for backends in self.sets.values())

    def statuses(self) -> list[BackendStatus]:
        per_device = {device: backends.statuses() for device, backends in self.sets.items()}
        if len(per_device) == 1:
            return next(iter(per_device.values()))
        devices = list(per_device)
        combined = []
        for position, first in enumerate(next(iter(per_device.values()))):
            mine = [(device, per_device[device][position]) for device in devices]
            worst_device, worst = min(mine, key=lambda m: _WORST_FIRST.index(m[1].state))
            precisions = sorted({s.precision for _, s in mine if s.precision})
            reason = f"{worst.reason} (on {worst_device})" if worst.reason else ""
            combined.append(
                dataclasses.replace(
                    worst, reason=reason, device=",".join(devices), precision=",".join(precisions)
                )
            )
        return combined
