"""The five pipeline stages' names, read from the contract (generation.proto's `Stage` enum).

Every process reads them from here, so the names a metric label, a telemetry
profile or a job's timings use cannot drift from the wire: a stage added to
the proto is a stage everywhere. The enum's order is the order they run in.
"""
from __future__ import annotations

from pb.orfeas.generation.v1 import generation_pb2 as pb

_PREFIX = "STAGE_"

# "image_loading", "image_preprocessing", "shape_generation", "texture_synthesis", "mesh_export"
STAGES: tuple[str, ...] = tuple(
    value.name.removeprefix(_PREFIX).lower()
    for value in sorted(pb.Stage.DESCRIPTOR.values, key=lambda v: v.number)
    if value.number != pb.STAGE_UNSPECIFIED
)


def stage_number(name: str) -> int:
    """The `Stage` enum value of a stage name ("shape_generation" -> STAGE_SHAPE_GENERATION)."""
    return pb.Stage.Value(f"{_PREFIX}{name.upper()}")
