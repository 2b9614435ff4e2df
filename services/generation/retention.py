"""Retention: finished jobs expire after a while, and result files stay under a disk budget.

An expired job leaves a tombstone, so asking for it answers NOT_FOUND with
the reason rather than a bare "not found".
"""
from __future__ import annotations

import asyncio
import logging
import time

from services.generation.artifacts import ArtifactStore
from services.generation.job_store import JobStore

log = logging.getLogger(__name__)


class RetentionSweeper:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, retention_s: float, budget_bytes: int) -> None:
        self.store = store
        self.artifacts = artifacts
        self.retention_s = retention_s
        self.budget_bytes = budget_bytes

    async def sweep(self) -> dict[str, int]:
        now = time.time()
        counts = {"expired": 0, "over_budget": 0}
        for job_id in self.store.expired(now - self.retention_s):
            await self._expire(job_id, f"older than the retention of {self.retention_s / 3600:g} hours", now)
            counts["expired"] += 1
        finished = self.store.finished_oldest_first()
        sizes = await asyncio.to_thread(lambda: {j: self.artifacts.results_bytes(j) for j, _ in finished})
        total = sum(sizes.values())
        for job_id, _ in finished:
            if total <= self.budget_bytes:
                break
            total -= sizes[job_id]
            reason = f"removed, oldest first, to keep results within the disk budget of {self.budget_bytes / 2**20:.1f} MiB"
            await self._expire(job_id, reason, now)
            counts["over_budget"] += 1
        if counts["expired"] or counts["over_budget"]:
            log.info("retention sweep", extra=counts)
        return counts

    async def _expire(self, job_id: str, reason: str, now: float) -> None:
        # Files first: a crash in between leaves a record without files, which
        # the next sweep removes, never files without a record.
        await asyncio.to_thread(self.artifacts.delete_job, job_id)
        self.store.expire(job_id, reason, now)

    async def run_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep must not end the service
                log.exception("retention sweep failed")
            await asyncio.sleep(interval_s)
