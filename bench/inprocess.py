"""The pipeline alone, in this process: the baseline every serving figure is compared with."""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from services.generation.pipeline.params import GenerationParams


def device_of(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_once(image: bytes, params: GenerationParams, device: torch.device) -> tuple[float, dict[str, float], Any]:
    """(wall seconds, {stage: seconds}, the exported mesh) of one in-process generation."""
    from services.generation.pipeline.run import run_pipeline

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    mesh, timings = run_pipeline(image, params, device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, dict(timings), mesh


def params_with(**changes: Any) -> GenerationParams:
    return replace(GenerationParams(), **changes)
