"""Records to protobuf messages (the way in is validation.py)."""
from __future__ import annotations

from pb.orfeas.telemetry.v1 import telemetry_pb2 as tpb
from services.common.telemetry_messages import device_sample_message
from services.telemetry.model import DeviceStatus
from services.telemetry.records import (
    CostEstimate,
    DecisionRecord,
    DeviceSampleRecord,
    DeviceState,
    Recommendation,
    Summary,
    Trends,
)

SEVERITY = {
    "info": tpb.SEVERITY_INFO,
    "warning": tpb.SEVERITY_WARNING,
    "critical": tpb.SEVERITY_CRITICAL,
}
MEMORY_TREND = {
    "unknown": tpb.MEMORY_TREND_UNKNOWN,
    "stable": tpb.MEMORY_TREND_STABLE,
    "rising": tpb.MEMORY_TREND_RISING,
    "falling": tpb.MEMORY_TREND_FALLING,
}


def summary(
    s: Summary, backend: str, window: tpb.Window, window_s: float, backends: list[str], worker_id: str = ""
) -> tpb.PerformanceSummary:
    return tpb.PerformanceSummary(
        backend=backend,
        window=window,
        window_seconds=window_s,
        total_pipelines=s.total_pipelines,
        succeeded_pipelines=s.succeeded_pipelines,
        failed_pipelines=s.failed_pipelines,
        avg_duration=s.avg_duration,
        min_duration=s.min_duration,
        max_duration=s.max_duration,
        p50_duration=s.p50_duration,
        p95_duration=s.p95_duration,
        stage_breakdown=[
            tpb.StageStats(
                name=st.name, count=st.count, avg_duration=st.avg_duration, p50=st.p50, p95=st.p95,
                max=st.max, min=st.min, share=st.share,
                substages=[
                    tpb.SubStageStats(
                        name=part.name, count=part.count, avg_duration=part.avg_duration, p50=part.p50,
                        p95=part.p95, share_of_stage=part.share_of_stage,
                    )
                    for part in st.substages
                ],
            )
            for st in s.stage_breakdown
        ],
        bottlenecks=[
            tpb.Bottleneck(stage=b.stage, share=b.share, severity=SEVERITY[b.severity]) for b in s.bottlenecks
        ],
        backends=backends,
        workers=[
            tpb.WorkerStats(
                worker_id=w.worker_id, device=w.device, total_pipelines=w.total_pipelines,
                succeeded_pipelines=w.succeeded_pipelines, failed_pipelines=w.failed_pipelines,
                avg_duration=w.avg_duration, p50_duration=w.p50_duration, p95_duration=w.p95_duration,
                avg_batch_size=w.avg_batch_size, share=w.share,
            )
            for w in s.workers
        ],
        worker_id=worker_id,
    )


def recommendation(r: Recommendation) -> tpb.Recommendation:
    return tpb.Recommendation(
        code=r.code, severity=SEVERITY[r.severity], message=r.message, figures=r.figures, subject=r.subject
    )


def device_sample(s: DeviceSampleRecord) -> tpb.DeviceSample:
    # The generation service sends the same message from its own record: the conversion lives in common.
    return device_sample_message(s)


def trends(t: Trends) -> tpb.Trends:
    msg = tpb.Trends(
        trend=MEMORY_TREND[t.trend], memory_slope_bytes_per_s=t.memory_slope_bytes_per_s, samples=t.samples
    )
    for name in ("avg_utilization", "avg_utilization_1m", "avg_utilization_5m", "avg_utilization_15m"):
        value = getattr(t, name)
        if value is not None:
            setattr(msg, name, value)
    return msg


def device_state(st: DeviceState) -> tpb.DeviceState:
    return tpb.DeviceState(latest=device_sample(st.latest), age_s=st.age_s, stale=st.stale, trends=trends(st.trends))


def device_status(status: DeviceStatus) -> tpb.DeviceStatus:
    return tpb.DeviceStatus(
        devices=[device_state(st) for st in status.devices],
        memory=tpb.MemoryTotals(
            total_bytes=status.memory.total_bytes,
            used_bytes=status.memory.used_bytes,
            free_bytes=status.memory.free_bytes,
            utilization_percent=status.memory.utilization_percent,
        ),
        trends=trends(status.trends),
        recommendations=[recommendation(r) for r in status.recommendations],
    )


def decision(d: DecisionRecord, target_utilization: float) -> tpb.BatchSizeDecision:
    return tpb.BatchSizeDecision(
        size=d.size,
        reasoning=d.reasoning,
        decision_id=d.id,
        per_item_bytes=d.per_item_bytes,
        available_bytes=d.available_bytes,
        budget_bytes=d.budget_bytes,
        target_utilization=target_utilization,
        memory_bound_size=d.memory_bound_size,
        basis=d.basis,
    )


def decision_record(d: DecisionRecord) -> tpb.DecisionRecord:
    msg = tpb.DecisionRecord(
        id=d.id,
        decided_at=d.decided_at,
        worker_id=d.worker_id,
        device=d.device,
        backend=d.backend,
        resolution=d.resolution,
        steps=d.steps,
        queue_length=d.queue_length,
        image_width=d.image_width,
        image_height=d.image_height,
        available_bytes=d.available_bytes,
        per_item_bytes=d.per_item_bytes,
        basis=d.basis,
        size=d.size,
        reasoning=d.reasoning,
    )
    if d.ran_size is not None:
        msg.ran_size = d.ran_size
    if d.peak_memory_bytes is not None:
        msg.peak_memory_bytes = d.peak_memory_bytes
    if d.out_of_memory is not None:
        msg.out_of_memory = d.out_of_memory
    return msg


def cost(c: CostEstimate) -> tpb.CostEstimate:
    return tpb.CostEstimate(
        backend=c.key.backend,
        resolution=c.key.resolution,
        steps=c.key.steps,
        per_item_bytes=c.per_item_bytes,
        basis=c.basis,
        observations=c.observations,
        last_per_item_bytes=c.last_per_item_bytes,
        max_per_item_bytes=c.max_per_item_bytes,
        oom_floor_bytes=c.oom_floor_bytes,
        updated_at=c.updated_at,
    )
