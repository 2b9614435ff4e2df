"""The parameters of one generation: defaults and ranges in one place.

The ranges here are the ones documented in protos/orfeas/generation/v1/
generation.proto; `validate` is the single check every door (gRPC, REST
through gRPC, the in-process pipeline) goes through.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields

from services.common.errors import InvalidArgument

FORMATS: tuple[str, ...] = ("glb", "obj", "stl", "ply")
BACKGROUND_MODES: tuple[str, ...] = ("auto", "on", "off")
BACKENDS: tuple[str, ...] = ("inflate",)

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 8192
MAX_IMAGE_PIXELS = 40_000_000
MAX_SEED = 2**63 - 1

# field -> (min, max), inclusive.
RANGES: dict[str, tuple[float, float]] = {
    "seed": (0, MAX_SEED),
    "resolution": (64, 1024),
    "steps": (1, 500),
    "face_count": (1_000, 500_000),
    "texture_size": (256, 4096),
    "foreground_ratio": (0.5, 1.0),
}

REQUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True)
class GenerationParams:
    seed: int = 0
    resolution: int = 256
    steps: int = 50
    face_count: int = 40_000
    texture: bool = True
    texture_size: int = 1024
    remove_background: str = "auto"
    foreground_ratio: float = 0.85
    format: str = "glb"
    backend: str = "inflate"

    def batch_key(self) -> tuple[str, int, int]:
        """Jobs with the same key can share one batched shape_generation call."""
        return (self.backend, self.resolution, self.steps)

    def to_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def validate(params: GenerationParams) -> GenerationParams:
    """Raise InvalidArgument naming the first field out of range; return params."""
    for name, (low, high) in RANGES.items():
        value = getattr(params, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument(name, f"must be a number, got {value!r}")
        if value != value or not low <= value <= high:  # value != value: NaN
            raise InvalidArgument(name, f"must be between {_fmt(low)} and {_fmt(high)}, got {_fmt(value)}")
        if name != "foreground_ratio" and int(value) != value:
            raise InvalidArgument(name, f"must be a whole number, got {value!r}")
    if params.format not in FORMATS:
        raise InvalidArgument("format", f"must be one of {', '.join(FORMATS)}, got {params.format!r}")
    if params.remove_background not in BACKGROUND_MODES:
        raise InvalidArgument(
            "remove_background", f"must be one of {', '.join(BACKGROUND_MODES)}, got {params.remove_background!r}"
        )
    if params.backend not in BACKENDS:
        raise InvalidArgument("backend", f"must be one of {', '.join(BACKENDS)}, got {params.backend!r}")
    if not isinstance(params.texture, bool):
        raise InvalidArgument("texture", f"must be true or false, got {params.texture!r}")
    return params


def validate_request_id(request_id: str) -> str:
    if request_id and not REQUEST_ID_PATTERN.match(request_id):
        raise InvalidArgument("request_id", "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")
    return request_id


def _fmt(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"
