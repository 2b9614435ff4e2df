"""A test-only shape backend, loaded through GENERATION_BACKEND_PLUGINS=tests.hanging_backend.

`hang` never returns and never looks at should_stop, as a wedged driver call would: only the
stall watchdog can get the worker past it. It also sends one progress report whose detail is not
text, so the background task that records it fails: the failure must be logged once and handled.
"""
from __future__ import annotations

import time

import torch

from services.common.errors import ServiceError
from services.generation.backends.base import (
    BatchTimings,
    ProgressCallback,
    ShapeBackend,
    ShapeItem,
    ShapeSettings,
    StopCheck,
)
from services.generation.pipeline.params import BackendParameters, ParameterRange
from services.generation.pipeline.records import Shape


class HangingBackend(ShapeBackend):
    name = "hang"

    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        return 1 << 20

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
        if progress is not None:
            progress(0.5, 12345)  # type: ignore[arg-type]  # not text: recording it fails
        while True:
            time.sleep(3600)


BACKEND = HangingBackend()
PARAMETERS = BackendParameters(
    name="hang",
    description="test-only: a shape_generation call that never returns",
    resolution=ParameterRange("resolution", 64, 256, 64, "unused"),
    steps=ParameterRange("steps", 1, 10, 1, "unused"),
    guidance_scale=None,
)
