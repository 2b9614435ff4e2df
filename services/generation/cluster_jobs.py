"""The job manager of one instance among several, all sharing one PostgreSQL store (pg_store.py).

JobManager (jobs.py) keeps its queue in memory, which is right for one
instance. Here the queue is the database's: the same life-cycle, the same
commit-first rule (a change is committed with its event before anything else
learns of it), and these differences:

- **Claims** take compatible queued jobs with `FOR UPDATE SKIP LOCKED`, each
  with a lease that the heartbeat renews every lease/3. A job whose lease ran
  out (its instance died or lost the database) is put back in the queue by
  any live instance, counting the attempt, or failed "interrupted" when none
  is left; a cancel committed for it meanwhile ends it cancelled.
- **Events** are read from the database. A watcher waits for the database's
  notice that its job changed (LISTEN/NOTIFY), then reads what is new, so
  any instance streams any job, past events first and then live ones; a slow
  poll covers a notice lost with a connection.
- **Cancel** commits the flag; the notice reaches the instance running the
  job, which reloads the record and stops at the next step boundary.
- **Admission** counts the queue limit over the whole cluster (pg_store's
  queue counter, its row locked), quotes Retry-After from the cluster's
  recent finishes, and answers a repeated request_id with its first job
  wherever it was made.
- **Queued events** (the place in the queue) are written for the first
  `queue_events_depth` waiting jobs whose place moved; the others learn theirs
  on the way up. A status call always gives the exact place.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from itertools import pairwise

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common import metrics
from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.generation import lifecycle
from services.generation.artifacts import ArtifactStore, check_job_id
from services.generation.jobs import (
    JobManager,
    LiveJob,
    _checked,
    _claim_change,
    _event,
    _loaded_progress,
    _new_record,
    _parse_event,
    _same_request,
    _submit_events,
    _terminal_event,
)
from services.generation.pg_store import Notice, PgJobStore, QueueFull
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import LoadedImage
from services.generation.storage import StorageMonitor
from services.generation.store import Change, JobRecord, StoreUnavailable

log = logging.getLogger(__name__)

# A watcher or an idle worker looks again this often even without a notice (one lost with a connection).
POLL_S = 2.0
# Decoded pictures kept for jobs admitted here, so the instance that claims one of them skips image_loading.
ADMITTED_KEPT = 16


def batch_key_text(params: dict) -> str:
    """GenerationParams.batch_key as the text the queue's index holds."""
    backend, resolution, steps, guidance = GenerationParams(**params).batch_key()
    return f"{backend}|{resolution}|{steps}|{guidance!r}"


class Signals:
    """Per job, an asyncio.Event that the next notice about it sets; kept only while someone waits."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}
        self._waiting: dict[str, int] = {}

    def current(self, key: str) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def follow(self, key: str) -> None:
        self._waiting[key] = self._waiting.get(key, 0) + 1

    def unfollow(self, key: str) -> None:
        left = self._waiting.get(key, 1) - 1
        if left > 0:
            self._waiting[key] = left
        else:
            self._waiting.pop(key, None)
            self._events.pop(key, None)

    def fire(self, key: str) -> None:
        event = self._events.pop(key, None)
        if event is not None:
            event.set()

    def fire_all(self) -> None:
        events, self._events = self._events, {}
        for event in events.values():
            event.set()


class ClusterJobManager(JobManager):
    store: PgJobStore

    def __init__(
        self,
        store: PgJobStore,
        artifacts: ArtifactStore,
        queue_limit: int,
        max_attempts: int,
        storage: StorageMonitor | None = None,
        *,
        instance: str,
        lease_s: float,
        queue_events_depth: int = 100,
    ) -> None:
        super().__init__(store, artifacts, queue_limit, max_attempts, storage)  # type: ignore[arg-type]
        # host:port: the prefix of this instance's worker ids, and the origin of its database changes.
        self.instance = instance
        self.lease_s = lease_s
        self.queue_events_depth = queue_events_depth
        self._signals = Signals()
        self._queue_signal = asyncio.Event()
        self._admitted: OrderedDict[str, LoadedImage] = OrderedDict()
        self._queue_length = 0
        self._head_id = ""
        self._positions_wanted = False
        self._positions_task: asyncio.Task[None] | None = None

    # --- start-up and shut-down ---------------------------------------------------
    async def recover(self) -> dict[str, int]:
        """Put back what an earlier life of this instance was running (its leases would run out anyway:
        this is sooner), and whatever else has an expired lease. Queued jobs are the cluster's."""
        counts = {"requeued": 0, "interrupted": 0, "cancelled": 0}
        while True:
            applied = await self.store.reclaim(self._reclaim_change, owner=self.instance)
            for a in applied:
                counts[self._reclaimed(a.after)] += 1
            if len(applied) < 100:
                break
        self._queue_length = await self.store.queue_length()
        if counts["requeued"]:
            self._want_positions()
        return counts

    def start(self) -> None:
        self.tasks.spawn(
            self.store.listen(self._on_notice, self._on_queue_notice, self._on_connected), "database-notices"
        )
        self.tasks.spawn(self._heartbeat_loop(), "lease-heartbeat")
        self.tasks.spawn(self._housekeeping_loop(), "reclaim-and-deadlines")

    async def close(self) -> None:
        self._closing = True
        self._signals.fire_all()
        await super().close()

    # --- notices from the database ----------------------------------------------------
    def _on_notice(self, notice: Notice) -> None:
        self._signals.fire(notice.job_id)
        job = self._live.get(notice.job_id)
        if job is not None and notice.origin != self.instance and notice.version > job.record.version:
            # Another instance changed a job running here: a cancel, or a reclaim after our lease ran out.
            self.tasks.spawn(self._reload(job), f"reload-{job.id}")

    def _on_queue_notice(self) -> None:
        self._previous_arrival, self._last_arrival = self._last_arrival, time.monotonic()
        self._wake_queue()

    def _on_connected(self) -> None:
        """Anything announced while the connection was down was missed: everyone looks again."""
        self._signals.fire_all()
        self._wake_queue()
        for job in list(self._live.values()):
            self.tasks.spawn(self._reload(job), f"reload-{job.id}")

    def _wake_queue(self) -> None:
        previous, self._queue_signal = self._queue_signal, asyncio.Event()
        previous.set()

    async def _reload(self, job: LiveJob) -> None:
        token = job.record.claim_token
        try:
            record = await self.store.get(job.id)
        except StoreUnavailable:
            return  # the reconnection reloads it
        if record is None or record.version <= job.record.version:
            return
        job.publish(record)
        if record.status != lifecycle.RUNNING or record.claim_token != token:
            # Not ours any more (our lease ran out and another instance took it back): stop working on it.
            log.warning(
                "a job running here was taken back by the cluster",
                extra={"job_id": job.id, "status": record.status, "worker_id": record.worker_id},
            )
            self._live.pop(job.id, None)
            job.abandoned.set()

    # --- the public operations ------------------------------------------------------
    async def submit(
        self,
        params: GenerationParams,
        image: bytes,
        payload_sha256: str,
        loaded: LoadedImage,
        loading_s: float,
        request_id: str = "",
        deadline: float | None = None,
        cancel_on_disconnect: bool = False,
    ) -> JobRecord:
        if not self._accepting:
            raise Unavailable("the generation service is shutting down; retry shortly")
        if not image:
            raise InvalidArgument("image", "is required (the encoded picture's bytes)")
        if self.storage is not None:
            self.storage.check_admission()
        record = _new_record(params, payload_sha256, loading_s, request_id, deadline, cancel_on_disconnect)
        # The picture is on the shared disk before the record says "queued": whichever instance claims
        # the job finds it.
        await asyncio.to_thread(self.artifacts.write_input, record.id, image)
        try:
            stored, created, _position = await self.store.admit(
                record, lambda position: _submit_events(record, loading_s, position), self.queue_limit
            )
        except QueueFull as full:
            await asyncio.to_thread(self.artifacts.delete_input, record.id)
            raise ResourceExhausted(
                f"queue full: {full.waiting} jobs waiting across the cluster (limit {self.queue_limit}); retry later",
                retry_after_s=await self._retry_after_s(),
            ) from None
        except BaseException:
            await asyncio.to_thread(self.artifacts.delete_input, record.id)
            raise
        if not created:
            await asyncio.to_thread(self.artifacts.delete_input, record.id)
            return _same_request(stored, payload_sha256, request_id)
        metrics.record_stage("image_loading", loading_s)
        self._admitted[record.id] = loaded
        while len(self._admitted) > ADMITTED_KEPT:
            self._admitted.popitem(last=False)
        return record

    async def _retry_after_s(self) -> float:
        """Twice the time between two jobs finishing anywhere in the cluster lately (a place frees about
        that often), an idle spell counting at most 10 s."""
        try:
            finishes = await self.store.recent_finishes(10)
        except StoreUnavailable:
            return 2.0
        gaps = [min(10.0, a - b) for a, b in pairwise(finishes)]
        return max(1.0, 2 * (sum(gaps) / len(gaps))) if gaps else 2.0

    async def get(self, job_id: str) -> tuple[JobRecord, int]:
        check_job_id(job_id)
        record = await self.store.get(job_id)
        if record is None:
            await self._not_found(job_id)
        return record, await self.position(record)

    async def position(self, record: JobRecord) -> int:
        return await self.store.position(record) if record.status == lifecycle.QUEUED else 0

    async def positions(self, records: list[JobRecord]) -> list[int]:
        return [await self.position(r) for r in records]

    def queue_position(self, job_id: str) -> int:
        return 0  # the queue is the database's: ask `position`

    async def watch(self, job_id: str, after: int = 0) -> AsyncIterator[pb.GenerationEvent]:
        await self.get(job_id)
        sent = after
        self._signals.follow(job_id)
        try:
            while True:
                changed = self._signals.current(job_id)  # before reading: a notice from now on wakes us
                new = [_parse_event(data) for data in await self.store.events(job_id, sent)]
                for event in new:
                    yield event
                    sent = event.sequence
                    if event.kind == pb.EVENT_KIND_TERMINAL:
                        return
                if new:
                    continue
                if self._closing:
                    raise Unavailable(f"the generation service is restarting; watch again to resume after event {sent}")
                try:
                    await asyncio.wait_for(changed.wait(), POLL_S)
                except TimeoutError:
                    pass
        finally:
            self._signals.unfollow(job_id)

    # --- the worker's side -----------------------------------------------------------
    @property
    def queue_length(self) -> int:
        """The cluster's queue, as last counted (every second or so)."""
        return self._queue_length

    def head_image_size(self) -> tuple[int, int]:
        loaded = self._admitted.get(self._head_id)
        return loaded.size if loaded is not None else (0, 0)

    async def _queue_head(self) -> JobRecord:
        """The oldest queued job anywhere, waiting for one (database trouble is waited out, said once)."""
        down_since = 0.0
        while True:
            signal = self._queue_signal
            try:
                head = await self.store.queue_head()
            except StoreUnavailable as exc:
                if not down_since:
                    down_since = time.monotonic()
                    log.warning("cannot read the queue; waiting for the job database", extra={"error": exc.message})
                await asyncio.sleep(1.0)
                continue
            if head is not None:
                return head
            try:
                await asyncio.wait_for(signal.wait(), POLL_S)
            except TimeoutError:
                pass

    async def batch_window(self, max_size: int, max_delay_s: float) -> tuple[GenerationParams, int]:
        head = await self._queue_head()
        self._head_id = head.id
        params = GenerationParams(**head.params)
        key = batch_key_text(head.params)
        if time.monotonic() - self._previous_arrival > max_delay_s:
            max_delay_s = 0.0  # a lone request starts at once (see JobManager.batch_window)
        give_up_at = time.monotonic() + max_delay_s
        while True:
            signal = self._queue_signal
            try:
                waiting, head_queued = await self.store.waiting_with(key, max_size, head.id)
            except StoreUnavailable:
                return params, 1  # the claim will say whether anything can be taken
            remaining = give_up_at - time.monotonic()
            if waiting >= max_size or remaining <= 0 or not head_queued:
                return params, max(1, waiting)
            try:
                await asyncio.wait_for(signal.wait(), remaining)
            except TimeoutError:
                pass

    async def take_batch(
        self, params: GenerationParams, size: int, claim_token: str, worker_id: str = "", device: str = ""
    ) -> list[LiveJob]:
        """Claim up to `size` compatible queued jobs from the cluster's queue, oldest first."""
        admitted = dict(self._admitted)  # what this claim may use, fixed before it commits
        async with self._claiming:
            applied, left = await self.store.claim(
                batch_key_text(params.to_dict()),
                size,
                lambda r: _claim_change(r.id, r.id in admitted, claim_token, worker_id, device),
            )
        claimed = []
        for a in applied:
            job = LiveJob(record=a.after, events=[a.event] if a.event is not None else [])  # type: ignore[list-item]
            job.loaded = admitted.get(job.id)
            self._admitted.pop(job.id, None)
            self._live[job.id] = job
            metrics.record_queue_wait((a.after.started_at or time.time()) - a.after.created_at)
            claimed.append(job)
        if claimed and left:  # the jobs still waiting moved up
            self._want_positions()
        return claimed

    async def emit_stage(
        self, job: LiveJob, stage: str, state: str, stage_progress: float, elapsed_s: float, detail: str = ""
    ) -> bool:
        """As JobManager.emit_stage; while the database is away the job waits at this step, for as long as its
        lease would last. Past that the job is left for the cluster to take back (False)."""
        give_up = time.monotonic() + self.lease_s
        pause = 0.2
        while True:
            try:
                return await super().emit_stage(job, stage, state, stage_progress, elapsed_s, detail)
            except StoreUnavailable as exc:
                if exc.disk_full or state == "progress":
                    raise
                if time.monotonic() + pause > give_up:
                    log.warning("the job database stayed away; leaving the job to be taken back",
                                extra={"job_id": job.id, "error": exc.message})
                    return False
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    @property
    def running_count(self) -> int:
        return sum(1 for job in self._live.values() if job.record.status == lifecycle.RUNNING)

    # --- internals -------------------------------------------------------------------
    def _back_in_queue(self, jobs: list[LiveJob]) -> None:
        """Requeued jobs are the cluster's again: any instance may take them (the database said so to all)."""
        for job in jobs:
            job.loaded = None
            job.abandoned = asyncio.Event()
            self._live.pop(job.id, None)
        if jobs:
            self._want_positions()

    async def _drop_expired(self) -> None:
        """A job whose deadline passed in the queue is never started (any instance may end it)."""
        ids = await self.store.past_deadline(time.time())
        if not ids:
            return
        error = ("DEADLINE_EXCEEDED", "deadline exceeded while the job waited in the queue")
        results = await self.store.apply(
            [self._finish_change(i, lifecycle.QUEUED, lifecycle.FAILED, error=error) for i in ids]
        )
        for applied in results:
            if applied is not None:
                self._ended(applied.after)
        self._want_positions()

    def _reclaim_change(self, record: JobRecord) -> Change:
        """A running job whose instance is gone: back to the queue (the attempt counted), or ended."""
        token = record.claim_token
        if record.cancel_requested:
            error = (lifecycle.CANCELLED_CODE, "cancelled by the client (the instance running it stopped first)")
            change = _checked(lambda r: lifecycle.finish(r, lifecycle.CANCELLED, error=error))
        elif record.attempts >= self.max_attempts:
            error = (lifecycle.INTERRUPTED, f"interrupted: the instance running it stopped, {record.attempts} times")
            change = _checked(lambda r: lifecycle.finish(r, lifecycle.FAILED, error=error))
        else:
            change = _checked(lambda r: lifecycle.requeue(r, count_attempt=True, progress=_loaded_progress(r)))
        return Change(
            record.id,
            expect=lambda r: r.status == lifecycle.RUNNING and r.claim_token == token,
            change=change,
            event=lambda r: _terminal_event(r) if r.terminal else _event(r, kind=pb.EVENT_KIND_QUEUED),
        )

    def _reclaimed(self, record: JobRecord) -> str:
        mine = self._live.pop(record.id, None)
        if mine is not None:
            # Our own claim ran out (the database was away longer than the lease): whatever still works on it
            # here stops; the queue has it again.
            mine.publish(record)
            mine.abandoned.set()
        if record.terminal:
            self._ended(record)
            return "cancelled" if record.status == lifecycle.CANCELLED else "interrupted"
        return "requeued"

    async def _reclaim(self) -> None:
        applied = await self.store.reclaim(self._reclaim_change)
        for a in applied:
            outcome = self._reclaimed(a.after)
            log.warning(
                "took back a job whose instance stopped renewing its lease",
                extra={"job_id": a.after.id, "worker_id": a.before.worker_id, "outcome": outcome,
                       "attempts": a.after.attempts},
            )
        if applied:
            self._want_positions()

    async def _heartbeat_loop(self) -> None:
        """Renew the leases of the jobs running here, every third of a lease (every second while the
        database is away, so they are renewed as soon as it is back)."""
        while True:
            tokens = [
                j.record.claim_token
                for j in self._live.values()
                if j.record.status == lifecycle.RUNNING and j.record.claim_token
            ]
            try:
                await self.store.renew(tokens)  # type: ignore[arg-type]
                await asyncio.sleep(self.lease_s / 3)
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    async def _housekeeping_loop(self) -> None:
        """Deadlines of queued jobs (twice a second), leases that ran out (every third of a lease) and the
        queue's length (every second), for the whole cluster; any instance may do each."""
        next_reclaim = next_count = 0.0
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            try:
                await self._drop_expired()
                if now >= next_reclaim:
                    next_reclaim = now + self.lease_s / 3
                    await self._reclaim()
                if now >= next_count:
                    next_count = now + 1.0
                    self._queue_length = await self.store.queue_length()
            except StoreUnavailable:
                await asyncio.sleep(1.0)

    def _want_positions(self) -> None:
        """Report queue places soon, one report at a time, however many changes asked for one."""
        self._positions_wanted = True
        if self._positions_task is None or self._positions_task.done():
            self._positions_task = self.tasks.spawn(self._positions_loop(), "queue-positions")

    async def _positions_loop(self) -> None:
        while self._positions_wanted:
            self._positions_wanted = False
            await self._report_queue_positions()

    async def _report_queue_positions(self) -> None:
        """A queued event for each of the first queue_events_depth waiting jobs whose place moved."""

        def note(record: JobRecord, position: int) -> Change:
            return Change(
                record.id,
                expect=lambda r: r.status == lifecycle.QUEUED,
                change=_checked(lifecycle.note),
                event=lambda r: _event(r, kind=pb.EVENT_KIND_QUEUED, queue_position=position),
            )

        try:
            await self.store.report_positions(self.queue_events_depth, note)
        except StoreUnavailable as exc:
            # Only news about places: the next change reports them again.
            log.warning("queue places were not reported", extra={"error": exc.message})
