"""The REST contract's ranges, enums, patterns and defaults, declared once.

The numbers are the ones generation.proto documents (and the generation
service checks, services/generation/pipeline/params.py); the gateway may not
import the service, so tests/test_openapi_contract.py reads the proto's
comments and params.py and fails when either disagrees with this file. The
enums come from the proto's own descriptors, so they cannot drift.

The request models (gateway/models/generations.py) build their fields and
the per-backend rules of the OpenAPI document from these tables.
"""
from __future__ import annotations

from dataclasses import dataclass

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common.stages import STAGES


@dataclass(frozen=True)
class Range:
    """An inclusive range and the default a request that leaves the field out gets.

    `default` None: there is no one default (a random seed, or a default that
    depends on the backend)."""

    minimum: int | float
    maximum: int | float
    default: int | float | None = None
    meaning: str = ""  # for a backend-specific parameter: what it means for that backend


@dataclass(frozen=True)
class BackendRanges:
    """What resolution, steps and guidance_scale mean and allow for one backend."""

    resolution: Range
    steps: Range
    # None: the backend has no guidance; the value is still checked against the widest range and reported as 0.
    guidance_scale: Range | None

    def get(self, name: str) -> Range | None:
        return getattr(self, name)


BACKEND_PARAMETERS = ("resolution", "steps", "guidance_scale")
BACKENDS: dict[str, BackendRanges] = {
    "inflate": BackendRanges(
        resolution=Range(64, 1024, 256, "reconstruction grid, cells a side"),
        steps=Range(1, 500, 50, "solver iterations"),
        guidance_scale=None,
    ),
    "hunyuan3d": BackendRanges(
        resolution=Range(64, 512, 256, "octree resolution of the decoded volume"),
        steps=Range(1, 100, 30, "denoising steps"),
        guidance_scale=Range(0.0, 20.0, 5.0, "classifier-free guidance scale"),
    ),
}
DEFAULT_BACKEND = "inflate"

MAX_SEED = 2**63 - 1
# The parameters every backend shares.
SEED = Range(0, MAX_SEED)
FACE_COUNT = Range(1_000, 500_000, 40_000)
TEXTURE_SIZE = Range(256, 4096, 1024)
FOREGROUND_RATIO = Range(0.5, 1.0, 0.85)
TIMEOUT_SECONDS = Range(0, 86_400, 0)  # 0: no limit
TEXTURE_DEFAULT = True
PAGE_SIZE = Range(1, 100, 20)

REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
JOB_ID_PATTERN = r"^[a-z0-9]{8,64}$"
# next_page_token as the service writes it ("<created_at>:<id>"); empty: the first page.
PAGE_TOKEN_PATTERN = r"^([0-9]{1,20}(\.[0-9]{1,20})?:[a-z0-9]{8,64})?$"
# The telemetry service's names (protos/orfeas/telemetry/v1/telemetry.proto); empty: all of them.
TELEMETRY_BACKEND_PATTERN = r"^[A-Za-z0-9._-]{0,64}$"
WORKER_ID_MAX_LENGTH = 128
DECISIONS_LIMIT = Range(1, 1_000, 20)


def _names(enum: object, prefix: str) -> tuple[str, ...]:
    values = sorted(enum.DESCRIPTOR.values, key=lambda v: v.number)  # type: ignore[attr-defined]
    return tuple(v.name.removeprefix(prefix).lower() for v in values if v.number)


FORMATS = _names(pb.MeshFormat, "MESH_FORMAT_")  # glb, obj, stl, ply
DEFAULT_FORMAT = FORMATS[0]  # unspecified means GLB
BACKGROUND_MODES = _names(pb.BackgroundRemoval, "BACKGROUND_REMOVAL_")  # auto, on, off
DEFAULT_BACKGROUND = BACKGROUND_MODES[0]  # unspecified means AUTO
STATUSES = _names(pb.JobStatus, "JOB_STATUS_")  # queued, running, succeeded, failed, cancelled
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")
STAGE_NAMES = STAGES
STAGE_STATES = _names(pb.StageState, "STAGE_STATE_")  # started, progress, completed, failed
BACKEND_STATES = _names(pb.BackendState, "BACKEND_STATE_")  # ready, loading, unavailable

FORMAT_VALUES: dict[str, int] = {name: pb.MeshFormat.Value(f"MESH_FORMAT_{name.upper()}") for name in FORMATS}
BACKGROUND_VALUES: dict[str, int] = {
    name: pb.BackgroundRemoval.Value(f"BACKGROUND_REMOVAL_{name.upper()}") for name in BACKGROUND_MODES
}
STATUS_VALUES: dict[str, int] = {name: pb.JobStatus.Value(f"JOB_STATUS_{name.upper()}") for name in STATUSES}


def widest(name: str) -> Range:
    """The widest range any backend allows for a backend-specific parameter (what holds whatever the backend).

    A backend without guidance still has its guidance_scale checked, against this range."""
    ranges = [r for b in BACKENDS.values() if (r := b.get(name)) is not None]
    return Range(min(r.minimum for r in ranges), max(r.maximum for r in ranges))


def backend_range(backend: str, name: str) -> Range:
    """The range of `name` for `backend` (the widest for a parameter the backend ignores)."""
    return BACKENDS[backend].get(name) or widest(name)
