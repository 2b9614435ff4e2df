"""Aggregates over job profiles: durations, the per-stage breakdown, the
bottlenecks and the per-worker breakdown. Pure functions over records, so
they can be checked by hand.

Durations are taken over the succeeded profiles only: a failed job stops
early, and its short pipeline would pull every figure down.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from services.telemetry.records import Bottleneck, ProfileRecord, StageStats, SubStageStats, Summary, WorkerStats

# A stage is a bottleneck from this share of the pipeline, and critical from the next.
BOTTLENECK_WARNING_SHARE = 0.20
BOTTLENECK_CRITICAL_SHARE = 0.40


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default); q in [0, 1]."""
    if not sorted_values:
        return 0.0
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def severity_of_share(share: float) -> str | None:
    if share >= BOTTLENECK_CRITICAL_SHARE:
        return "critical"
    if share >= BOTTLENECK_WARNING_SHARE:
        return "warning"
    return None


def summarize(profiles: Sequence[ProfileRecord]) -> Summary:
    succeeded = [p for p in profiles if p.succeeded]
    totals = sorted(p.total_duration_s for p in succeeded)
    total_time = sum(totals)

    durations: dict[str, list[float]] = {}
    offsets: dict[str, list[float]] = {}
    # stage -> part -> (its durations, its stage's durations in the same profiles)
    parts: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for p in succeeded:
        for s in p.stages:
            durations.setdefault(s.name, []).append(s.duration_s)
            offsets.setdefault(s.name, []).append(s.start_offset_s)
            for name, seconds in s.substages:
                own, whole = parts.setdefault(s.name, {}).setdefault(name, ([], []))
                own.append(seconds)
                whole.append(s.duration_s)

    # Pipeline order: by where a stage starts on average, name breaking ties.
    order = sorted(durations, key=lambda name: (sum(offsets[name]) / len(offsets[name]), name))
    breakdown: list[StageStats] = []
    for name in order:
        values = sorted(durations[name])
        stage_time = sum(values)
        breakdown.append(
            StageStats(
                name=name,
                count=len(values),
                avg_duration=stage_time / len(values),
                p50=percentile(values, 0.50),
                p95=percentile(values, 0.95),
                max=values[-1],
                min=values[0],
                share=stage_time / total_time if total_time > 0 else 0.0,
                substages=tuple(_part_stats(part, own, whole) for part, (own, whole) in parts.get(name, {}).items()),
            )
        )

    bottlenecks = []
    for stage in sorted(breakdown, key=lambda s: s.share, reverse=True):
        severity = severity_of_share(stage.share)
        if severity is not None:
            bottlenecks.append(Bottleneck(stage=stage.name, share=stage.share, severity=severity))

    return Summary(
        total_pipelines=len(profiles),
        succeeded_pipelines=len(succeeded),
        failed_pipelines=len(profiles) - len(succeeded),
        avg_duration=total_time / len(totals) if totals else 0.0,
        min_duration=totals[0] if totals else 0.0,
        max_duration=totals[-1] if totals else 0.0,
        p50_duration=percentile(totals, 0.50),
        p95_duration=percentile(totals, 0.95),
        stage_breakdown=tuple(breakdown),
        bottlenecks=tuple(bottlenecks),
        workers=by_worker(profiles),
    )


def by_worker(profiles: Sequence[ProfileRecord]) -> tuple[WorkerStats, ...]:
    """Each worker's part of the profiles, ordered by worker id: how the work was shared out."""
    mine: dict[str, list[ProfileRecord]] = {}
    for p in profiles:
        mine.setdefault(p.worker_id, []).append(p)
    all_succeeded = sum(1 for p in profiles if p.succeeded)
    stats = []
    for worker_id in sorted(mine):
        own = mine[worker_id]
        succeeded = [p for p in own if p.succeeded]
        totals = sorted(p.total_duration_s for p in succeeded)
        stats.append(
            WorkerStats(
                worker_id=worker_id,
                device=own[-1].device,
                total_pipelines=len(own),
                succeeded_pipelines=len(succeeded),
                failed_pipelines=len(own) - len(succeeded),
                avg_duration=sum(totals) / len(totals) if totals else 0.0,
                p50_duration=percentile(totals, 0.50),
                p95_duration=percentile(totals, 0.95),
                avg_batch_size=sum(p.batch_size for p in succeeded) / len(succeeded) if succeeded else 0.0,
                share=len(succeeded) / all_succeeded if all_succeeded else 0.0,
            )
        )
    return tuple(stats)


def _part_stats(name: str, own: list[float], whole: list[float]) -> SubStageStats:
    values = sorted(own)
    return SubStageStats(
        name=name,
        count=len(values),
        avg_duration=sum(values) / len(values),
        p50=percentile(values, 0.50),
        p95=percentile(values, 0.95),
        share_of_stage=sum(values) / sum(whole) if sum(whole) > 0 else 0.0,
    )


def slowest_stage(profile: ProfileRecord) -> tuple[str, float]:
    """The stage that took longest in one profile and its share of the total ("", 0) when none."""
    if not profile.stages:
        return "", 0.0
    stage = max(profile.stages, key=lambda s: s.duration_s)
    share = stage.duration_s / profile.total_duration_s if profile.total_duration_s > 0 else 0.0
    return stage.name, share
