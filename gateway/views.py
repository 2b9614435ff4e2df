"""The REST shapes (gateway/models) of generation.proto's messages."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from gateway import parameters as p
from gateway.models.errors import ErrorDetail
from gateway.models.generations import (
    Generation,
    Links,
    MeshStats,
    QueuedEvent,
    ResolvedParameters,
    StageEvent,
    SubmittedGeneration,
    TerminalEvent,
)
from pb.orfeas.generation.v1 import generation_pb2 as pb


def _by_number(names: tuple[str, ...], enum: Any) -> dict[int, str]:
    return {number: name for number, name in zip(sorted(v.number for v in enum.DESCRIPTOR.values if v.number), names)}


STAGE_NAMES = _by_number(p.STAGE_NAMES, pb.Stage)
STATE_NAMES = _by_number(p.STAGE_STATES, pb.StageState)
STATUS_NAMES = _by_number(p.STATUSES, pb.JobStatus)
FORMAT_NAMES = _by_number(p.FORMATS, pb.MeshFormat)
BACKGROUND_NAMES = _by_number(p.BACKGROUND_MODES, pb.BackgroundRemoval)


def _time(msg: Any, name: str) -> datetime | None:
    if not msg.HasField(name):
        return None
    return getattr(msg, name).ToDatetime(tzinfo=UTC)


def mesh_stats(stats: pb.MeshStats) -> MeshStats:
    return MeshStats(
        vertices=stats.vertices,
        faces=stats.faces,
        watertight=stats.watertight,
        volume=stats.volume,
        extents=list(stats.extents),
        bytes={FORMAT_NAMES[s.format]: s.bytes for s in stats.sizes},
    )


def error(err: pb.Error) -> ErrorDetail:
    return ErrorDetail(code=err.code, message=err.message)


def parameters(params: pb.ResolvedParameters) -> ResolvedParameters:
    return ResolvedParameters(
        seed=params.seed,
        resolution=params.resolution,
        steps=params.steps,
        face_count=params.face_count,
        texture=params.texture,
        texture_size=params.texture_size,
        remove_background=BACKGROUND_NAMES.get(params.remove_background, p.DEFAULT_BACKGROUND),
        foreground_ratio=round(params.foreground_ratio, 6),
        format=FORMAT_NAMES.get(params.format, p.DEFAULT_FORMAT),
        backend=params.backend,
        guidance_scale=round(params.guidance_scale, 6),
    )


def generation(msg: pb.Generation) -> Generation:
    return Generation(
        id=msg.id,
        status=STATUS_NAMES[msg.status],
        stage=STAGE_NAMES.get(msg.stage),
        progress=round(msg.progress, 4),
        queue_position=msg.queue_position,
        parameters=parameters(msg.parameters),
        stage_timings={STAGE_NAMES[t.stage]: round(t.elapsed_seconds, 6) for t in msg.stage_timings},
        result=mesh_stats(msg.result) if msg.HasField("result") else None,
        error=error(msg.error) if msg.HasField("error") else None,
        request_id=msg.request_id or None,
        created_at=_time(msg, "created_at"),
        started_at=_time(msg, "started_at"),
        finished_at=_time(msg, "finished_at"),
        cancel_requested=msg.cancel_requested,
        attempts=msg.attempts,
        worker_id=msg.worker_id or None,
        device=msg.device or None,
        links=Links.of(msg.id),
    )


def submitted(msg: pb.Generation) -> SubmittedGeneration:
    return SubmittedGeneration(
        id=msg.id, status=STATUS_NAMES[msg.status], queue_position=msg.queue_position, links=Links.of(msg.id)
    )


def event(msg: pb.GenerationEvent) -> tuple[str, QueuedEvent | StageEvent | TerminalEvent]:
    """(SSE event name, data) for one GenerationEvent."""
    common: dict[str, Any] = {
        "id": msg.generation_id,
        "sequence": msg.sequence,
        "progress": round(msg.progress, 4),
        "time": _time(msg, "time"),
    }
    if msg.kind == pb.EVENT_KIND_QUEUED:
        return "queued", QueuedEvent(**common, queue_position=msg.queue_position)
    if msg.kind == pb.EVENT_KIND_TERMINAL:
        outcome = msg.outcome
        status = STATUS_NAMES.get(outcome.status, "failed")
        return status, TerminalEvent(
            **common,
            status=status,
            result=mesh_stats(outcome.result) if outcome.HasField("result") else None,
            error=error(outcome.error) if outcome.HasField("error") else None,
        )
    return "stage", StageEvent(
        **common,
        stage=STAGE_NAMES.get(msg.stage),
        state=STATE_NAMES.get(msg.state),
        stage_progress=round(msg.stage_progress, 4),
        elapsed_seconds=round(msg.elapsed_seconds, 6),
        # "denoising step 3 of 30", "decoding chunk 2 of 9", ...; null when the backend says nothing.
        detail=msg.detail or None,
    )
