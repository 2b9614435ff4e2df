"""Telemetry's model: what the servicer delegates to. It ties the store to the
aggregates, the recommendations, the device trends and the optimizer, and
logs one line per profile received.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from services.telemetry import aggregates, device_trends, recommendations
from services.telemetry.optimizer import BatchOptimizer
from services.telemetry.records import (
    DeviceSampleRecord,
    DeviceState,
    ProfileRecord,
    Recommendation,
    Summary,
    Trends,
)
from services.telemetry.store import TelemetryStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryTotals:
    total_bytes: int
    used_bytes: int
    free_bytes: int

    @property
    def utilization_percent(self) -> float:
        return 100.0 * self.used_bytes / self.total_bytes if self.total_bytes else 0.0


@dataclass(frozen=True)
class DeviceStatus:
    devices: list[DeviceState]
    memory: MemoryTotals
    trends: Trends
    recommendations: list[Recommendation]


class Telemetry:
    def __init__(
        self,
        store: TelemetryStore,
        window_s: float,
        target_utilization: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.window_s = window_s
        self.optimizer = BatchOptimizer(store, target_utilization, clock)
        self._clock = clock

    # ----------------------------------------------------------- profiles

    def report_profiles(self, profiles: Sequence[ProfileRecord]) -> tuple[int, int]:
        stored, duplicates = self.store.add_profiles(profiles, self._clock())
        for p in stored:
            self.optimizer.learn_from_profile(p)
            _log_profile(p)
        return len(stored), duplicates

    def summary(self, backend: str = "", window_s: float | None = None, worker_id: str = "") -> Summary:
        """All time when window_s is None, else the profiles that ended within it; one worker's when named."""
        since = None if window_s is None else self._clock() - window_s
        return aggregates.summarize(self.store.profiles(backend, since, worker_id))

    def backends(self) -> list[str]:
        return self.store.backends()

    def recommendations(self, backend: str = "") -> list[Recommendation]:
        """Per backend from the recent window (all time when the window is empty), then the devices."""
        recs: list[Recommendation] = []
        since = self._clock() - self.window_s
        for name in [backend] if backend else self.store.backends():
            profiles = self.store.profiles(name, since)
            if not any(p.succeeded for p in profiles):
                profiles = self.store.profiles(name)
            recs += recommendations.for_backend(name, profiles, aggregates.summarize(profiles))
        recs += recommendations.for_devices(one_per_device(self._device_states()[0]))
        return recommendations.ordered(recs)

    # ------------------------------------------------------------ devices

    def report_samples(self, samples: Sequence[DeviceSampleRecord]) -> tuple[int, int]:
        return self.store.add_samples(samples)

    def _device_states(self, worker_id: str = "") -> tuple[list[DeviceState], list[DeviceSampleRecord], float]:
        now = self._clock()
        recent = self.store.samples(now - device_trends.LONGEST_WINDOW_S, worker_id)
        states = device_trends.device_states(self.store.latest_samples(worker_id), recent, now)
        return states, recent, now

    def device_status(self, worker_id: str = "") -> DeviceStatus:
        states, recent, now = self._device_states(worker_id)
        live = physical_devices([st.latest for st in states if not st.stale])
        return DeviceStatus(
            devices=states,
            memory=MemoryTotals(
                total_bytes=sum(s.memory_total_bytes for s in live),
                used_bytes=sum(s.memory_used_bytes for s in live),
                free_bytes=sum(s.memory_free_bytes for s in live),
            ),
            trends=device_trends.combined_trends(states, recent, now),
            recommendations=recommendations.ordered(recommendations.for_devices(one_per_device(states))),
        )


def instance_of(worker_id: str) -> str:
    """The generation instance a worker belongs to: its id up to the last "/" ("host:50051" of
    "host:50051/cpu#1"); an id without one is an instance of its own."""
    return worker_id.rsplit("/", 1)[0] if "/" in worker_id else worker_id


def physical_devices(samples: Sequence[DeviceSampleRecord]) -> list[DeviceSampleRecord]:
    """One reading per device of an instance: workers that share a device (cpu#0 and cpu#1)
    report the same memory, which a total must count once."""
    newest: dict[tuple[str, str], DeviceSampleRecord] = {}
    for s in samples:
        key = (instance_of(s.worker_id), s.device)
        if key not in newest or s.sampled_at > newest[key].sampled_at:
            newest[key] = s
    return list(newest.values())


def one_per_device(states: Sequence[DeviceState]) -> list[DeviceState]:
    """The states of distinct devices (the first worker's where several share one): advice about a
    device's memory or use is said once, not once per worker on it."""
    seen: set[tuple[str, str]] = set()
    out = []
    for st in states:
        key = (instance_of(st.latest.worker_id), st.latest.device)
        if key not in seen:
            seen.add(key)
            out.append(st)
    return out


def _log_profile(p: ProfileRecord) -> None:
    slowest, share = aggregates.slowest_stage(p)
    log.info(
        "profile %s (%s): %.3f s, slowest stage %s at %.1f%%",
        p.job_id,
        p.backend,
        p.total_duration_s,
        slowest or "-",
        share * 100,
        extra={
            "event": "profile",
            "job_id": p.job_id,
            "backend": p.backend,
            "worker_id": p.worker_id,
            "device": p.device,
            "batch_size": p.batch_size,
            "succeeded": p.succeeded,
            "total_s": p.total_duration_s,
            "stages_s": {s.name: s.duration_s for s in p.stages},
            "slowest_stage": slowest,
            "slowest_share": share,
        },
    )
