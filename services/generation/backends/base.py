"""The contract every shape backend meets.

A backend turns silhouettes (the preprocessed grid masks) into closed,
outward-wound triangle meshes in the shared frame of pipeline/records.py.
It is called with a batch: all masks of one batch share the (R, R) shape,
and each item's result must not depend on what else is in the batch.
"""
from __future__ import annotations

import abc
from collections.abc import Callable

import numpy as np
import torch

from services.common.errors import Cancelled, ResourceExhausted
from services.generation.pipeline.records import Shape

ProgressCallback = Callable[[float], None]
StopCheck = Callable[[], bool]


class ShapeBackend(abc.ABC):
    name: str

    @abc.abstractmethod
    def generate(
        self,
        grid_masks: list[np.ndarray],
        *,
        steps: int,
        device: torch.device,
        progress: ProgressCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> list[Shape]:
        """One Shape per mask, in order. Raises Cancelled when should_stop() turns True."""

    @abc.abstractmethod
    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        """Modelled peak memory one batch item adds, in bytes."""


def check_stop(should_stop: StopCheck | None) -> None:
    if should_stop is not None and should_stop():
        raise Cancelled("cancelled")


def report(progress: ProgressCallback | None, fraction: float) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)))


def ensure_memory_fits(batch_size: int, item_bytes: int, device: torch.device) -> None:
    """Refuse up front a batch that cannot fit, rather than die half-way through it.

    A batch too big as a whole raises MemoryError (the caller can split it and retry); one item
    that cannot fit even alone is ResourceExhausted.
    """
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        # The caching allocator may hold freed blocks that mem_get_info counts as used.
        free_bytes += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        import psutil

        free_bytes = psutil.virtual_memory().available
    if item_bytes > free_bytes:
        raise ResourceExhausted(
            f"shape generation needs about {item_bytes / 2**20:.0f} MiB on {device.type} for one picture, "
            f"only {free_bytes / 2**20:.0f} MiB is free; lower the resolution"
        )
    if batch_size * item_bytes > free_bytes:
        raise MemoryError(
            f"out of memory: a batch of {batch_size} needs about {batch_size * item_bytes / 2**20:.0f} MiB "
            f"on {device.type}, only {free_bytes / 2**20:.0f} MiB is free"
        )
