"""The contract every shape backend meets.

A backend turns a batch of preprocessed pictures into closed, outward-wound
triangle meshes in the shared frame of pipeline/records.py. The batch shares
its ShapeSettings (the batch key: resolution, steps, guidance_scale); each
item brings its own picture and seed, and an item's result must not depend
on what else is in the batch. An item that fails on its own (an empty
surface, no foreground) comes back as a ServiceError in its place, so its
batch-mates still succeed; a failure of the whole call (out of memory,
cancelled) is raised.
"""
from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.common.errors import Cancelled, ResourceExhausted, ServiceError
from services.generation.pipeline.records import PreparedImage, Shape

# progress(fraction of shape_generation done 0..1, what is happening: "denoising step 3 of 30").
ProgressCallback = Callable[[float, str], None]
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class ShapeSettings:
    """What every item of a batch shares."""

    resolution: int
    steps: int
    guidance_scale: float = 0.0


@dataclass(frozen=True)
class ShapeItem:
    """One job's share of a batch."""

    image: PreparedImage
    seed: int
    face_count: int = 40_000  # the job's decimation target (learned meshes reach it before unwrapping)


@dataclass
class BatchTimings:
    """What a backend measured during one call, beside its shapes."""

    # Sub-stage -> seconds, e.g. {"denoising": 1.9, "volume_decoding": 0.6, "surface_extraction": 0.3}.
    substages: dict[str, float] = field(default_factory=dict)


class ShapeBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def generate_batch(
        self,
        items: list[ShapeItem],
        settings: ShapeSettings,
        *,
        device: torch.device,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
        timings: BatchTimings | None = None,
    ) -> list[Shape | ServiceError]:
        """One Shape (or the item's own error) per item, in order. Raises Cancelled when should_stop()
        turns True, MemoryError (or torch's out-of-memory error) when the batch does not fit."""

    @abc.abstractmethod
    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        """Modelled peak memory one batch item adds, in bytes. Weights are not in it: they are
        resident once per device from start-up and show as used memory already."""


def check_stop(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled")


def report(progress: ProgressCallback | None, fraction: float, detail: str = "") -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), detail)


def ensure_memory_fits(batch_size: int, item_bytes: int, device: torch.device) -> None:
    """Refuse up front a batch that cannot fit in the device's free memory, rather than die half-way through it."""
    check_fits(batch_size, item_bytes, free_memory_bytes(device), device.type)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        # The caching allocator may hold freed blocks that mem_get_info counts as used.
        return int(free_bytes + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(batch_size: int, item_bytes: int, free_bytes: int, device_type: str) -> None:
    """A batch too big as a whole raises MemoryError (the caller can split it and retry); one item
    that cannot fit even alone is ResourceExhausted."""
    if item_bytes > free_bytes:
        raise ResourceExhausted(
            f"shape generation needs about {item_bytes / 2**20:.0f} MiB on {device_type} for one picture, "
            f"only {free_bytes / 2**20:.0f} MiB is free; lower the resolution"
        )
    if batch_size * item_bytes > free_bytes:
        raise MemoryError(
            f"out of memory: a batch of {batch_size} needs about {batch_size * item_bytes / 2**20:.0f} MiB "
            f"on {device_type}, only {free_bytes / 2**20:.0f} MiB is free"
        )
