"""Between the wire (generation.proto messages) and our records."""
from __future__ import annotations

import secrets
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common.errors import InvalidArgument
from services.generation.backends.registry import BackendStatus
from services.generation.job_store import JobRecord
from services.generation.pipeline.params import (
    DEFAULT_BACKEND,
    MAX_SEED,
    GenerationParams,
    backend_defaults,
    validate,
    validate_request_id,
)
from services.generation.pipeline.records import STAGES

STAGE_ENUM: dict[str, int] = {name: pb.Stage.Value(f"STAGE_{name.upper()}") for name in STAGES}
STATE_ENUM: dict[str, int] = {
    s: pb.StageState.Value(f"STAGE_STATE_{s.upper()}") for s in ("started", "progress", "completed", "failed")
}
STATUS_ENUM: dict[str, int] = {
    s: pb.JobStatus.Value(f"JOB_STATUS_{s.upper()}")
    for s in ("queued", "running", "succeeded", "failed", "cancelled")
}
STATUS_NAME: dict[int, str] = {v: k for k, v in STATUS_ENUM.items()}
FORMAT_ENUM: dict[str, int] = {f: pb.MeshFormat.Value(f"MESH_FORMAT_{f.upper()}") for f in ("glb", "obj", "stl", "ply")}
FORMAT_NAME: dict[int, str] = {v: k for k, v in FORMAT_ENUM.items()}
BACKGROUND_ENUM: dict[str, int] = {
    m: pb.BackgroundRemoval.Value(f"BACKGROUND_REMOVAL_{m.upper()}") for m in ("auto", "on", "off")
}
BACKGROUND_NAME: dict[int, str] = {v: k for k, v in BACKGROUND_ENUM.items()}

# Share of the whole pipeline's progress each stage stands for; roughly its
# share of the time at default settings.
STAGE_WEIGHTS: dict[str, float] = {
    "image_loading": 0.05,
    "image_preprocessing": 0.10,
    "shape_generation": 0.40,
    "texture_synthesis": 0.15,
    "mesh_export": 0.30,
}


def overall_progress(stage: str, stage_fraction: float) -> float:
    done = 0.0
    for name in STAGES:
        if name == stage:
            return min(1.0, done + STAGE_WEIGHTS[name] * max(0.0, min(1.0, stage_fraction)))
        done += STAGE_WEIGHTS[name]
    return done


def params_from_request(req: pb.GenerateRequest, backends: Sequence[BackendStatus] = ()) -> GenerationParams:
    """Fill defaults (the backend's own for resolution, steps and guidance_scale: those of the variant it has
    loaded when `backends` says, so a turbo model gets 5 steps), resolve the seed, and check every range
    (InvalidArgument names the field)."""
    name = req.backend or DEFAULT_BACKEND
    loaded = next((status.parameters for status in backends if status.name == name), None)
    defaults = backend_defaults(name, loaded)
    if req.format and req.format not in FORMAT_NAME:
        raise InvalidArgument("format", f"unknown format value {req.format}")
    if req.remove_background and req.remove_background not in BACKGROUND_NAME:
        raise InvalidArgument("remove_background", f"unknown value {req.remove_background}")
    params = GenerationParams(
        seed=req.seed if req.HasField("seed") else secrets.randbelow(MAX_SEED + 1),
        resolution=req.resolution if req.HasField("resolution") else defaults.resolution,
        steps=req.steps if req.HasField("steps") else defaults.steps,
        face_count=req.face_count if req.HasField("face_count") else defaults.face_count,
        texture=req.texture if req.HasField("texture") else defaults.texture,
        texture_size=req.texture_size if req.HasField("texture_size") else defaults.texture_size,
        remove_background=BACKGROUND_NAME.get(req.remove_background, defaults.remove_background),
        foreground_ratio=(
            round(req.foreground_ratio, 6) if req.HasField("foreground_ratio") else defaults.foreground_ratio
        ),
        format=FORMAT_NAME.get(req.format, defaults.format),
        backend=req.backend or defaults.backend,
        guidance_scale=(
            round(req.guidance_scale, 6) if req.HasField("guidance_scale") else defaults.guidance_scale
        ),
    )
    validate_request_id(req.request_id)
    return validate(params)


def _timestamp(seconds: float | None) -> Timestamp | None:
    if seconds is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def mesh_stats(result: dict) -> pb.MeshStats:
    return pb.MeshStats(
        vertices=result["vertices"],
        faces=result["faces"],
        watertight=result["watertight"],
        sizes=[pb.FormatSize(format=FORMAT_ENUM[f], bytes=n) for f, n in result["sizes"].items()],
        volume=result["volume"],
        extents=result["extents"],
    )


def resolved_parameters(params: dict) -> pb.ResolvedParameters:
    return pb.ResolvedParameters(
        seed=params["seed"],
        resolution=params["resolution"],
        steps=params["steps"],
        face_count=params["face_count"],
        texture=params["texture"],
        texture_size=params["texture_size"],
        remove_background=BACKGROUND_ENUM[params["remove_background"]],
        foreground_ratio=params["foreground_ratio"],
        format=FORMAT_ENUM[params["format"]],
        backend=params["backend"],
        guidance_scale=params.get("guidance_scale", 0.0),
    )


def generation_message(job: JobRecord, queue_position: int = 0) -> pb.Generation:
    msg = pb.Generation(
        id=job.id,
        status=STATUS_ENUM[job.status],
        stage=STAGE_ENUM.get(job.stage, 0),
        progress=job.progress,
        parameters=resolved_parameters(job.params),
        stage_timings=[
            pb.StageTiming(stage=STAGE_ENUM[s], elapsed_seconds=t) for s, t in job.stage_timings.items()
        ],
        queue_position=queue_position,
        request_id=job.request_id or "",
        cancel_requested=job.cancel_requested and not job.terminal,
        attempts=job.attempts,
        # From the claim on; a requeued job has none until a worker takes it again.
        worker_id=job.worker_id or "",
        device=job.device or "",
    )
    if job.result is not None:
        msg.result.CopyFrom(mesh_stats(job.result))
    if job.error_code:
        msg.error.CopyFrom(pb.Error(code=job.error_code, message=job.error_message or ""))
    for name, value in (("created_at", job.created_at), ("started_at", job.started_at), ("finished_at", job.finished_at)):
        ts = _timestamp(value)
        if ts is not None:
            getattr(msg, name).CopyFrom(ts)
    return msg


def outcome_message(job: JobRecord) -> pb.Outcome:
    outcome = pb.Outcome(status=STATUS_ENUM[job.status])
    if job.result is not None:
        outcome.result.CopyFrom(mesh_stats(job.result))
    if job.error_code:
        outcome.error.CopyFrom(pb.Error(code=job.error_code, message=job.error_message or ""))
    return outcome


def event_time(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


BACKEND_STATE_ENUM: dict[str, int] = {
    s: pb.BackendState.Value(f"BACKEND_STATE_{s.upper()}") for s in ("ready", "loading", "unavailable")
}


def backend_message(status: BackendStatus) -> pb.Backend:
    return pb.Backend(
        name=status.name,
        state=BACKEND_STATE_ENUM[status.state],
        reason=status.reason,
        is_default=status.is_default,
        description=status.parameters.description,
        device=status.device,
        precision=status.precision,
        variant=status.variant,
        parameters=[
            pb.ParameterRange(name=r.name, minimum=r.minimum, maximum=r.maximum, default=r.default, meaning=r.meaning)
            for r in status.parameters.ranges()
        ],
    )
