"""Every job's profile goes to telemetry, without ever slowing the job down."""
from __future__ import annotations

from collections.abc import Callable

from services.generation.jobs import LiveJob
from services.generation.telemetry_client import PipelineProfile, StageProfile, TelemetryClient
from services.generation.worker import JobProfile


class TelemetryProfileSink:
    def __init__(
        self,
        telemetry: TelemetryClient,
        worker_id: str,
        precision_of: Callable[[str], str] | None = None,
        telemetry_name: Callable[[str], str] | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.worker_id = worker_id
        # backend name -> the precision it computes in ("fp16" for hunyuan3d on CUDA); fp32 when not told.
        self.precision_of = precision_of or (lambda _backend: "fp32")
        # backend name -> the name its profiles are aggregated under (with hunyuan3d's variant and decoder,
        # "hunyuan3d.turbo.flashvdm"); its own name when not told.
        self.telemetry_name = telemetry_name or (lambda backend: backend)

    def report(self, job: LiveJob, profile: JobProfile) -> None:
        # Only whole pipelines make meaningful aggregates; failures are counted by metrics instead.
        if not profile.succeeded:
            return
        self.telemetry.report_profile(
            PipelineProfile(
                job_id=profile.job_id,
                backend=self.telemetry_name(profile.backend),
                worker_id=self.worker_id,
                device=profile.device,
                batch_size=profile.batch_size,
                image_width=profile.image_size[0],
                image_height=profile.image_size[1],
                resolution=profile.resolution,
                steps=profile.steps,
                started_at=profile.started_at,
                total_duration_s=profile.total_s,
                stages=[
                    StageProfile(s.name, s.start_offset_s, s.duration_s, s.memory_peak_bytes) for s in profile.stages
                ],
                succeeded=profile.succeeded,
                face_count=profile.face_count,
                precision=self.precision_of(profile.backend),
                substages={s.name: dict(s.substages) for s in profile.stages if s.substages},
            )
        )
