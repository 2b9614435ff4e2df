"""A test-only shape backend, loaded by the service through GENERATION_BACKEND_PLUGINS=tests.slow_backend.

`slow` takes `steps` seconds in shape_generation, saying nothing meanwhile (a quiet stage, as a
learned model's decoding can be), and stopping within 0.1 s when asked; then it builds the mesh
with `inflate`, so every later stage runs for real.
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
    check_stop,
)
from services.generation.backends.inflate import instance as inflate
from services.generation.pipeline.params import BackendParameters, ParameterRange
from services.generation.pipeline.records import Shape


class SlowBackend(ShapeBackend):
    name = "slow"

    def estimate_item_bytes(self, resolution: int, steps: int) -> int:
        return inflate().estimate_item_bytes(resolution, 50)

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
        until = time.monotonic() + settings.steps
        while time.monotonic() < until:
            check_stop(should_stop)
            time.sleep(0.1)
        return inflate().generate_batch(items, ShapeSettings(settings.resolution, 50), device=device)


BACKEND = SlowBackend()
PARAMETERS = BackendParameters(
    name="slow",
    description="test-only: a quiet shape_generation of `steps` seconds, then inflate",
    resolution=ParameterRange("resolution", 64, 256, 96, "reconstruction grid, cells a side"),
    steps=ParameterRange("steps", 1, 600, 5, "seconds spent in shape_generation"),
    guidance_scale=None,
)
