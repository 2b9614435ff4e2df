"""The REST shapes of generation.proto's messages."""
from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from pb.orfeas.generation.v1 import generation_pb2 as pb

STAGE_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("STAGE_").lower() for v in pb.Stage.DESCRIPTOR.values if v.number
}
STATE_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("STAGE_STATE_").lower() for v in pb.StageState.DESCRIPTOR.values if v.number
}
STATUS_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("JOB_STATUS_").lower() for v in pb.JobStatus.DESCRIPTOR.values if v.number
}
STATUS_VALUES: dict[str, int] = {name: number for number, name in STATUS_NAMES.items()}
FORMAT_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("MESH_FORMAT_").lower() for v in pb.MeshFormat.DESCRIPTOR.values if v.number
}
FORMAT_VALUES: dict[str, int] = {name: number for number, name in FORMAT_NAMES.items()}
BACKGROUND_NAMES: dict[int, str] = {
    v.number: v.name.removeprefix("BACKGROUND_REMOVAL_").lower()
    for v in pb.BackgroundRemoval.DESCRIPTOR.values
    if v.number
}
BACKGROUND_VALUES: dict[str, int] = {name: number for number, name in BACKGROUND_NAMES.items()}


def _time(msg: Any, name: str) -> str | None:
    if not msg.HasField(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return ts.ToJsonString()


def links(job_id: str) -> dict[str, str]:
    base = f"/api/v1/generations/{job_id}"
    return {"self": base, "events": f"{base}/events", "websocket": f"{base}/ws", "result": f"{base}/result"}


def mesh_stats(stats: pb.MeshStats) -> dict[str, Any]:
    return {
        "vertices": stats.vertices,
        "faces": stats.faces,
        "watertight": stats.watertight,
        "volume": stats.volume,
        "extents": list(stats.extents),
        "bytes": {FORMAT_NAMES[s.format]: s.bytes for s in stats.sizes},
    }


def error(err: pb.Error) -> dict[str, str]:
    return {"code": err.code, "message": err.message}


def generation(msg: pb.Generation) -> dict[str, Any]:
    p = msg.parameters
    return {
        "id": msg.id,
        "status": STATUS_NAMES.get(msg.status, "unknown"),
        "stage": STAGE_NAMES.get(msg.stage),
        "progress": round(msg.progress, 4),
        "queue_position": msg.queue_position,
        "parameters": {
            "seed": p.seed,
            "resolution": p.resolution,
            "steps": p.steps,
            "face_count": p.face_count,
            "texture": p.texture,
            "texture_size": p.texture_size,
            "remove_background": BACKGROUND_NAMES.get(p.remove_background, "auto"),
            "foreground_ratio": round(p.foreground_ratio, 6),
            "format": FORMAT_NAMES.get(p.format, "glb"),
            "backend": p.backend,
            "guidance_scale": round(p.guidance_scale, 6),
        },
        "stage_timings": {STAGE_NAMES[t.stage]: round(t.elapsed_seconds, 6) for t in msg.stage_timings},
        "result": mesh_stats(msg.result) if msg.HasField("result") else None,
        "error": error(msg.error) if msg.HasField("error") else None,
        "request_id": msg.request_id or None,
        "created_at": _time(msg, "created_at"),
        "started_at": _time(msg, "started_at"),
        "finished_at": _time(msg, "finished_at"),
        "links": links(msg.id),
    }


def event(msg: pb.GenerationEvent) -> tuple[str, dict[str, Any]]:
    """(SSE event name, JSON data) for one GenerationEvent."""
    data: dict[str, Any] = {
        "id": msg.generation_id,
        "sequence": msg.sequence,
        "progress": round(msg.progress, 4),
        "time": msg.time.ToJsonString() if msg.HasField("time") else None,
    }
    if msg.kind == pb.EVENT_KIND_QUEUED:
        data["queue_position"] = msg.queue_position
        return "queued", data
    if msg.kind == pb.EVENT_KIND_TERMINAL:
        status = STATUS_NAMES.get(msg.outcome.status, "failed")
        data["status"] = status
        data["result"] = mesh_stats(msg.outcome.result) if msg.outcome.HasField("result") else None
        data["error"] = error(msg.outcome.error) if msg.outcome.HasField("error") else None
        return status, data
    data.update(
        stage=STAGE_NAMES.get(msg.stage),
        state=STATE_NAMES.get(msg.state),
        stage_progress=round(msg.stage_progress, 4),
        elapsed_seconds=round(msg.elapsed_seconds, 6),
    )
    if msg.detail:
        data["detail"] = msg.detail  # "denoising step 3 of 30", "decoding chunk 2 of 9", ...
    return "stage", data
