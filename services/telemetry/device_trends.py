"""Device trends from samples: is memory rising, and how busy has the device
been over the last 1, 5 and 15 minutes. Kept per (worker, device), since
several generation workers may report.
"""
from __future__ import annotations

from collections.abc import Sequence

from services.telemetry.records import DeviceSampleRecord, DeviceState, Trends

TREND_WINDOW_S = 300.0
LONGEST_WINDOW_S = 900.0
# Used memory must move by more than this share of the total over
# TREND_WINDOW_S to count as rising or falling; allocator caches jitter below it.
TREND_THRESHOLD_SHARE = 0.02
MIN_TREND_SAMPLES = 3
# A device that has not reported for this long is shown but left out of the totals.
STALE_AFTER_S = 60.0


def _mean_utilization(samples: Sequence[DeviceSampleRecord], since: float) -> float | None:
    values = [s.utilization_percent for s in samples if s.sampled_at >= since and s.utilization_percent is not None]
    return sum(values) / len(values) if values else None


def _slope(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None when x does not vary."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_x = sum((x - mean_x) ** 2 for x, _ in points)
    if var_x == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var_x


def memory_trend(samples: Sequence[DeviceSampleRecord], now: float) -> tuple[str, float]:
    """("rising" | "falling" | "stable" | "unknown", slope in bytes/s) over the last 5 minutes."""
    recent = [s for s in samples if s.sampled_at >= now - TREND_WINDOW_S]
    if len(recent) < MIN_TREND_SAMPLES:
        return "unknown", 0.0
    slope = _slope([(s.sampled_at, float(s.memory_used_bytes)) for s in recent])
    total = recent[-1].memory_total_bytes
    if slope is None or total <= 0:
        return "unknown", 0.0
    change = slope * TREND_WINDOW_S
    if change > TREND_THRESHOLD_SHARE * total:
        return "rising", slope
    if change < -TREND_THRESHOLD_SHARE * total:
        return "falling", slope
    return "stable", slope


def trends(samples: Sequence[DeviceSampleRecord], now: float) -> Trends:
    """Trends of one device from its samples (any order)."""
    ordered = sorted(samples, key=lambda s: s.sampled_at)
    trend, slope = memory_trend(ordered, now)
    return Trends(
        trend=trend,
        memory_slope_bytes_per_s=slope,
        avg_utilization_1m=_mean_utilization(ordered, now - 60.0),
        avg_utilization_5m=_mean_utilization(ordered, now - 300.0),
        avg_utilization_15m=_mean_utilization(ordered, now - 900.0),
        samples=sum(1 for s in ordered if s.sampled_at >= now - LONGEST_WINDOW_S),
    )


def device_states(
    latest: Sequence[DeviceSampleRecord], recent: Sequence[DeviceSampleRecord], now: float
) -> list[DeviceState]:
    """One state per device: its latest sample, its age and its trends from `recent`."""
    by_device: dict[tuple[str, str], list[DeviceSampleRecord]] = {}
    for s in recent:
        by_device.setdefault((s.worker_id, s.device), []).append(s)
    states = []
    for s in latest:
        age = max(0.0, now - s.sampled_at)
        states.append(
            DeviceState(
                latest=s,
                age_s=age,
                stale=age > STALE_AFTER_S,
                trends=trends(by_device.get((s.worker_id, s.device), []), now),
            )
        )
    return states


def combined_trends(states: Sequence[DeviceState], recent: Sequence[DeviceSampleRecord], now: float) -> Trends:
    """All devices at once: rising if any device rises, else falling if any falls."""
    known = [st.trends.trend for st in states if st.trends.trend != "unknown"]
    if "rising" in known:
        trend = "rising"
    elif "falling" in known:
        trend = "falling"
    elif known:
        trend = "stable"
    else:
        trend = "unknown"
    return Trends(
        trend=trend,
        memory_slope_bytes_per_s=sum(st.trends.memory_slope_bytes_per_s for st in states),
        avg_utilization_1m=_mean_utilization(recent, now - 60.0),
        avg_utilization_5m=_mean_utilization(recent, now - 300.0),
        avg_utilization_15m=_mean_utilization(recent, now - 900.0),
        samples=sum(1 for s in recent if s.sampled_at >= now - LONGEST_WINDOW_S),
    )
