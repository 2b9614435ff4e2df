"""Recommendations derived from measured numbers. Every rule looks at the
profiles or the device samples, and every recommendation carries the figures
it rests on, so an operator can check it.
"""
from __future__ import annotations

from collections.abc import Sequence

from services.telemetry.aggregates import (
    BOTTLENECK_CRITICAL_SHARE,
    BOTTLENECK_WARNING_SHARE,
    percentile,
)
from services.telemetry.records import (
    MIB,
    DeviceState,
    ProfileRecord,
    Recommendation,
    Summary,
)

# The generation service's default steps; above it, steps are "high".
REFERENCE_STEPS = 50
# A device is under-used below this average utilisation (5 minutes) while at
# least this share of its memory is free.
UNDERUSED_UTILIZATION = 50.0
UNDERUSED_FREE_SHARE = 0.30
MIN_DEVICE_SAMPLES = 3
NEARLY_FULL_SHARE = 0.95
MIN_FACE_COUNT = 1_000
# FlashVDM's lightning volume decoder is worth turning on once volume decoding takes this share of
# shape_generation (the generation service reports it as a part of the stage, "volume_decoding").
FLASHVDM_DECODING_SHARE = 0.5
# The last part of a backend name whose volumes FlashVDM decodes already ("hunyuan3d.turbo.flashvdm"): the
# generation service reports its backends under such names.
FLASHVDM_SUFFIX = "flashvdm"

_SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def for_backend(backend: str, profiles: Sequence[ProfileRecord], summary: Summary) -> list[Recommendation]:
    """Rules over one backend's profiles and their summary."""
    if summary.succeeded_pipelines == 0:
        return []
    recs: list[Recommendation] = []
    recs += _bottlenecks(backend, summary)
    recs += _face_count(backend, profiles, summary)
    recs += _steps(backend, profiles, summary)
    recs += _fp16(backend, profiles)
    recs += _flashvdm(backend, summary)
    return recs


def for_devices(states: Sequence[DeviceState]) -> list[Recommendation]:
    recs: list[Recommendation] = []
    for state in states:
        if state.stale:
            continue
        recs += _underused(state)
        recs += _memory(state)
    return recs


def ordered(recs: Sequence[Recommendation]) -> list[Recommendation]:
    return sorted(recs, key=lambda r: _SEVERITY_ORDER.get(r.severity, 3))


def _top_stage(summary: Summary) -> tuple[str, float]:
    if not summary.stage_breakdown:
        return "", 0.0
    top = max(summary.stage_breakdown, key=lambda s: s.share)
    return top.name, top.share


def _bottlenecks(backend: str, summary: Summary) -> list[Recommendation]:
    recs = []
    for rank, b in enumerate(summary.bottlenecks):
        stage = summary.stage(b.stage)
        assert stage is not None
        advice = " — optimize it first" if rank == 0 else ""
        recs.append(
            Recommendation(
                code="optimize_bottleneck",
                severity=b.severity,
                message=f"{b.stage} takes {b.share:.1%} of the pipeline{advice}",
                figures={
                    "share": b.share,
                    "share_percent": round(b.share * 100, 1),
                    "avg_duration_s": stage.avg_duration,
                    "p95_duration_s": stage.p95,
                    "avg_pipeline_s": summary.avg_duration,
                    "pipelines": float(summary.succeeded_pipelines),
                },
                subject=f"backend={backend} stage={b.stage}",
            )
        )
    return recs


def _face_count(backend: str, profiles: Sequence[ProfileRecord], summary: Summary) -> list[Recommendation]:
    top, share = _top_stage(summary)
    if top != "mesh_export" or share < BOTTLENECK_WARNING_SHARE:
        return []
    stage = summary.stage("mesh_export")
    assert stage is not None
    counts = sorted(p.face_count for p in profiles if p.succeeded and p.face_count > 0)
    figures = {"mesh_export_share": share, "mesh_export_avg_s": stage.avg_duration}
    if counts:
        median = percentile(counts, 0.5)
        # Halving the target is a step an operator can measure the effect of.
        suggested = max(MIN_FACE_COUNT, int(round(median / 2, -3)))
        figures |= {"face_count_p50": median, "suggested_face_count": float(suggested)}
        advice = f"at {median:,.0f} faces (median) — lower face_count, e.g. to {suggested:,}"
    else:
        advice = "— lower face_count"
    return [
        Recommendation(
            code="lower_face_count",
            severity="critical" if share >= BOTTLENECK_CRITICAL_SHARE else "warning",
            message=f"mesh_export dominates the pipeline ({share:.1%}) {advice}",
            figures=figures,
            subject=f"backend={backend} stage=mesh_export",
        )
    ]


def _steps(backend: str, profiles: Sequence[ProfileRecord], summary: Summary) -> list[Recommendation]:
    top, share = _top_stage(summary)
    if top != "shape_generation" or share < BOTTLENECK_CRITICAL_SHARE:
        return []
    steps = sorted(p.steps for p in profiles if p.succeeded)
    median_steps = percentile(steps, 0.5)
    if median_steps <= REFERENCE_STEPS:
        return []
    stage = summary.stage("shape_generation")
    assert stage is not None
    # Shape generation iterates `steps` times; its time is taken as proportional.
    estimate = stage.avg_duration * REFERENCE_STEPS / median_steps
    return [
        Recommendation(
            code="reduce_steps",
            severity="warning",
            message=(
                f"shape_generation takes {share:.1%} of the pipeline at {median_steps:g} steps (median) — reduce "
                f"steps: at {REFERENCE_STEPS} it would take about {estimate:.2f} s instead of "
                f"{stage.avg_duration:.2f} s, if its time scales with steps"
            ),
            figures={
                "shape_generation_share": share,
                "shape_generation_avg_s": stage.avg_duration,
                "steps_p50": median_steps,
                "suggested_steps": float(REFERENCE_STEPS),
                "estimated_shape_generation_s": estimate,
            },
            subject=f"backend={backend} stage=shape_generation",
        )
    ]


def _fp16(backend: str, profiles: Sequence[ProfileRecord]) -> list[Recommendation]:
    cuda = [p for p in profiles if p.succeeded and p.device.startswith("cuda")]
    fp32 = [p for p in cuda if p.precision == "fp32"]
    if not fp32:
        return []
    shape = [s.duration_s for p in fp32 for s in p.stages if s.name == "shape_generation"]
    figures = {"fp32_cuda_pipelines": float(len(fp32)), "cuda_pipelines": float(len(cuda))}
    detail = ""
    if shape:
        avg = sum(shape) / len(shape)
        figures["shape_generation_avg_s"] = avg
        detail = f"; shape_generation averages {avg:.2f} s there"
    return [
        Recommendation(
            code="enable_fp16",
            severity="warning",
            message=f"{len(fp32)} of {len(cuda)} pipelines on CUDA ran in fp32 — enable fp16{detail}",
            figures=figures,
            subject=f"backend={backend}",
        )
    ]


def _flashvdm(backend: str, summary: Summary) -> list[Recommendation]:
    if backend.rsplit(".", 1)[-1] == FLASHVDM_SUFFIX:
        return []
    stage = summary.stage("shape_generation")
    decoding = next((p for p in stage.substages if p.name == "volume_decoding"), None) if stage else None
    if stage is None or decoding is None or decoding.share_of_stage < FLASHVDM_DECODING_SHARE:
        return []
    return [
        Recommendation(
            code="enable_flashvdm",
            severity="warning",
            message=(
                f"volume decoding is {decoding.share_of_stage:.0%} of shape_generation ({decoding.avg_duration:.2f} s "
                f"of {stage.avg_duration:.2f} s on average) — enable FlashVDM (HUNYUAN3D_FLASHVDM=1), which decodes "
                "finely only near the surface"
            ),
            figures={
                "volume_decoding_share": decoding.share_of_stage,
                "volume_decoding_avg_s": decoding.avg_duration,
                "shape_generation_avg_s": stage.avg_duration,
                "pipelines": float(decoding.count),
            },
            subject=f"backend={backend} stage=shape_generation",
        )
    ]


def _underused(state: DeviceState) -> list[Recommendation]:
    s, t = state.latest, state.trends
    util = t.avg_utilization_5m
    if util is None or t.samples < MIN_DEVICE_SAMPLES or util >= UNDERUSED_UTILIZATION:
        return []
    if s.memory_total_bytes <= 0:
        return []
    free_share = s.memory_free_bytes / s.memory_total_bytes
    if free_share < UNDERUSED_FREE_SHARE:
        return []
    kind = "GPU" if s.device_type == "cuda" else "device"
    return [
        Recommendation(
            code="raise_batch_size",
            severity="warning" if s.device_type == "cuda" else "info",
            message=(
                f"{kind} {s.device} on {s.worker_id} is under-used (avg {util:.0f}% over 5 min, "
                f"{s.memory_free_bytes / MIB:,.0f} MB free) — raise the batch size"
            ),
            figures={
                "avg_utilization_5m": util,
                "free_mb": s.memory_free_bytes / MIB,
                "free_share": free_share,
                "samples": float(t.samples),
            },
            subject=f"worker={s.worker_id} device={s.device}",
        )
    ]


def _memory(state: DeviceState) -> list[Recommendation]:
    s, t = state.latest, state.trends
    recs = []
    subject = f"worker={s.worker_id} device={s.device}"
    if t.trend == "rising":
        per_min = t.memory_slope_bytes_per_s * 60 / MIB
        recs.append(
            Recommendation(
                code="memory_rising",
                severity="warning",
                message=(
                    f"memory on {s.device} ({s.worker_id}) is rising by {per_min:,.0f} MB/min over 5 min "
                    f"— look for a leak, or lower the batch size"
                ),
                figures={
                    "slope_mb_per_min": per_min,
                    "used_mb": s.memory_used_bytes / MIB,
                    "total_mb": s.memory_total_bytes / MIB,
                },
                subject=subject,
            )
        )
    if s.memory_total_bytes > 0 and s.memory_used_bytes / s.memory_total_bytes >= NEARLY_FULL_SHARE:
        used_share = s.memory_used_bytes / s.memory_total_bytes
        recs.append(
            Recommendation(
                code="memory_nearly_full",
                severity="critical",
                message=f"{s.device} on {s.worker_id} has {used_share:.1%} of its memory in use — lower the batch size",
                figures={"used_share": used_share, "free_mb": s.memory_free_bytes / MIB},
                subject=subject,
            )
        )
    return recs
