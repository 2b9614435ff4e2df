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

# An input picture without a job record this old was never queued (a crash while submitting).
ORPHAN_INPUT_AGE_S = 3600.0


class RetentionSweeper:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, retention_s: float, budget_bytes: int) -> None:
        self.store = store
        self.artifacts = artifacts
        self.retention_s = retention_s
        self.budget_bytes = budget_bytes

    async def sweep(self) -> dict[str, int]:
        now = time.time()
        counts = {"expired": 0, "over_budget": 0, "orphans": 0}
        for job_id in await self.store.finished_before(now - self.retention_s):
            if await self._expire(job_id, f"older than the retention of {self.retention_s / 3600:g} hours", now):
                counts["expired"] += 1
        finished = await self.store.finished_oldest_first()
        sizes = await asyncio.to_thread(lambda: {j: self.artifacts.results_bytes(j) for j, _ in finished})
        total = sum(sizes.values())
        for job_id, _ in finished:
            if total <= self.budget_bytes:
                break
            total -= sizes[job_id]
            reason = f"removed, oldest first, to keep results within the disk budget of {self.budget_bytes / 2**20:.1f} MiB"
            if await self._expire(job_id, reason, now):
                counts["over_budget"] += 1
        counts["orphans"] = await self._remove_orphans(now)
        if any(counts.values()):
            log.info("retention sweep", extra=counts)
        return counts

    async def _expire(self, job_id: str, reason: str, now: float) -> bool:
        # The record first: once it is gone (a tombstone says why) nobody is
        # served a result, so nobody can be served a result whose file is gone.
        # A crash in between leaves files without a record, which
        # _remove_orphans deletes at the next sweep.
        if not await self.store.expire(job_id, reason, now):
            return False
        await asyncio.to_thread(self.artifacts.delete_job, job_id)
        return True

    async def _remove_orphans(self, now: float) -> int:
        """Files whose job has no record: left by a crash between the two steps of an expiry, or
        (inputs only, after an hour) by one between writing a picture and queueing its job."""
        results, inputs = await asyncio.to_thread(self.artifacts.stored_ids, now - ORPHAN_INPUT_AGE_S)
        candidates = sorted(results | inputs)
        known = await self.store.known_ids(candidates)
        orphans = [job_id for job_id in candidates if job_id not in known]
        for job_id in orphans:
            await asyncio.to_thread(self.artifacts.delete_job, job_id)
        return len(orphans)

    async def run_forever(self, interval_s: float) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - a failed sweep must not end the service
                log.exception("retention sweep failed")
            await asyncio.sleep(interval_s)
