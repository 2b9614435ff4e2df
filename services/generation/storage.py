"""Free space under DATA_DIR, and the reserve below which the service stops taking work.

A full disk is a temporary, clean refusal: below the reserve a submission is
RESOURCE_EXHAUSTED with a message starting "storage:" (HTTP 507 at the
gateway), the health report says degraded naming storage, and as soon as
space returns everything goes on by itself. The reserve leaves room for the
jobs already accepted to finish and for the database to record their ends.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from services.common import metrics
from services.common.errors import ResourceExhausted


@dataclass(frozen=True)
class StorageState:
    free_bytes: int
    reserve_bytes: int

    @property
    def ok(self) -> bool:
        return self.free_bytes >= self.reserve_bytes

    def describe(self) -> str:
        return (
            f"storage: {self.free_bytes / 2**20:.0f} MiB free under DATA_DIR, below the reserve of "
            f"{self.reserve_bytes / 2**20:.0f} MiB (GENERATION_MIN_FREE_MB)"
        )


class StorageMonitor:
    """Reads free space at most every `interval_s` (statvfs is cheap, but admission is a hot path)."""

    def __init__(self, data_dir: Path, reserve_bytes: int, interval_s: float = 0.5) -> None:
        self.data_dir = data_dir
        self.reserve_bytes = reserve_bytes
        self.interval_s = interval_s
        self._state: StorageState | None = None
        self._read_at = 0.0
        metrics.track_storage_free(lambda: float(self.state().free_bytes))

    def state(self) -> StorageState:
        now = time.monotonic()
        if self._state is None or now - self._read_at >= self.interval_s:
            stat = os.statvfs(self.data_dir)
            self._state = StorageState(stat.f_bavail * stat.f_frsize, self.reserve_bytes)
            self._read_at = now
        return self._state

    def check_admission(self) -> None:
        state = self.state()
        if not state.ok:
            raise ResourceExhausted(f"{state.describe()}; retry once space is freed", retry_after_s=30.0)
