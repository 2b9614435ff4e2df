"""The job manager: accepts jobs, keeps the queue, publishes events.

This is the model object the gRPC servicer delegates to, and the worker's
source of batches. Every change of a job goes the same way:

1. a transition of lifecycle.py is committed by the store, in one
   transaction with the event that reports it;
2. only then is the in-memory record replaced, the event appended and the
   watchers woken (`LiveJob.publish`, synchronous, so the order in which
   changes commit is the order in which watchers see them);
3. then metrics.

A failed commit changes nothing, and the caller gets the error.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
from PIL import Image

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common import metrics
from services.common.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.common.tasks import TaskSupervisor
from services.generation import convert, lifecycle
from services.generation.artifacts import CONTENT_TYPES, FILE_NAMES, ArtifactStore, ChecksumMismatch, check_job_id
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import LoadedImage
from services.generation.storage import StorageMonitor
from services.generation.store import Applied, Change, JobRecord, JobStore

log = logging.getLogger(__name__)

# Kept for callers that name the reason; the life-cycle owns it.
INTERRUPTED = lifecycle.INTERRUPTED


@dataclass
class LiveJob:
    """A job that is queued or running, with the events watchers follow.

    `record` and `events` only ever hold what the store has committed.
    """

    record: JobRecord
    events: list[pb.GenerationEvent] = field(default_factory=list)
    # Set (and replaced) at every change; a watcher waits on the one it saw.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # The decoded picture from admission, so the worker need not decode it
    # again; None after a restart, when the worker loads it from disk.
    loaded: LoadedImage | None = None
    # The queue position the last queued event told watchers (0: none yet).
    reported_position: int = 0
    # When the last change was committed (monotonic): the stall watchdog's measure of progress.
    changed_at: float = field(default_factory=time.monotonic)
    # Set by the watchdog when the job stalled: whatever waits on its work stops waiting.
    abandoned: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(**self.record.params)

    @property
    def cancel_requested(self) -> bool:
        return self.record.cancel_requested

    def expired(self, at: float | None = None) -> bool:
        deadline = self.record.deadline
        return deadline is not None and (at or time.time()) >= deadline

    def publish(self, record: JobRecord, event: pb.GenerationEvent | None = None) -> None:
        """Show a committed change to memory and wake the watchers."""
        if record.version >= self.record.version:
            self.record = record
        if event is not None:
            self.events.append(event)
        self.changed_at = time.monotonic()
        self.wake()

    def wake(self) -> None:
        previous, self.changed = self.changed, asyncio.Event()
        previous.set()


class JobManager:
    def __init__(
        self,
        store: JobStore,
        artifacts: ArtifactStore,
        queue_limit: int,
        max_attempts: int,
        storage: StorageMonitor | None = None,
    ) -> None:
        self.store = store
        self.artifacts = artifacts
        self.storage = storage
        self.queue_limit = queue_limit
        self.max_attempts = max_attempts
        self.tasks = TaskSupervisor("jobs")
        self._live: dict[str, LiveJob] = {}
        self._queue: list[str] = []  # ids of queued jobs, in order
        self._queue_changed = asyncio.Event()
        self._claiming = asyncio.Lock()
        # (job, format) -> the lock of the one download writing that format now.
        self._writing_formats: dict[tuple[str, str], asyncio.Lock] = {}
        self._accepting = True
        self._closing = False
        # Seconds between two jobs finishing, smoothed: a full queue frees a
        # place about that often, so it is the retry delay quoted to clients.
        self._finish_interval_s = 1.0
        self._last_finish = 0.0
        # When the last two jobs arrived (monotonic): the batch window waits only during a burst.
        self._last_arrival = self._previous_arrival = float("-inf")

    # --- start-up and shut-down ---------------------------------------------------
    async def recover(self) -> dict[str, int]:
        """Requeue what a crash left queued or running; end what must not run again.

        A cancel accepted before the crash sticks; a Generate caller that asked for
        cancel-on-disconnect is gone with the old process; a job that was running
        has spent an attempt, and fails "interrupted" when it has none left.
        """
        counts = {"requeued": 0, "queued": 0, "interrupted": 0, "cancelled": 0}
        for record in await self.store.active():
            change = self._recovery_change(record)
            if change is None:
                job = await self._load_live(record)
                counts["queued"] += 1
            else:
                (applied,) = await self.store.apply([change])
                if applied is None:
                    continue
                job = await self._load_live(applied.after)
                if applied.after.terminal:
                    counts["cancelled" if applied.after.status == lifecycle.CANCELLED else "interrupted"] += 1
                    continue
                counts["requeued"] += 1
            self._live[job.id] = job
            self._queue.append(job.id)
        if self._queue:
            self._queue_changed.set()
        await self._report_queue_positions()
        return counts

    def _recovery_change(self, record: JobRecord) -> Change | None:
        if record.cancel_requested:
            error = (lifecycle.CANCELLED_CODE, "cancelled by the client (the cancel was accepted before a restart)")
            return self._finish_change(record.id, record.status, lifecycle.CANCELLED, error=error, any_claim=True)
        if record.cancel_on_disconnect:
            error = (lifecycle.CANCELLED_CODE, "cancelled: the Generate call that asked for it ended with a restart")
            return self._finish_change(record.id, record.status, lifecycle.CANCELLED, error=error, any_claim=True)
        if record.status != lifecycle.RUNNING:
            return None
        if record.attempts >= self.max_attempts:
            error = (lifecycle.INTERRUPTED, f"interrupted: the service stopped while the job ran, {record.attempts} times")
            return self._finish_change(record.id, lifecycle.RUNNING, lifecycle.FAILED, error=error, any_claim=True)
        return Change(
            record.id,
            expect=lambda r: r.status == lifecycle.RUNNING,
            change=_checked(lambda r: lifecycle.requeue(r, count_attempt=True, progress=_loaded_progress(r))),
            event=lambda r: _event(r, kind=pb.EVENT_KIND_QUEUED),
        )

    async def _load_live(self, record: JobRecord) -> LiveJob:
        job = LiveJob(record=record)
        job.events = [_parse_event(b) for b in await self.store.events(record.id)]
        return job

    def start(self) -> None:
        self.tasks.spawn(self._deadline_loop(), "deadlines")

    def stop_accepting(self) -> None:
        self._accepting = False

    async def close(self) -> None:
        """End every open stream with UNAVAILABLE (the service is stopping), and the background tasks."""
        self._closing = True
        for job in list(self._live.values()):
            job.wake()
        await self.tasks.close()

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
        """Queue a job whose picture admission already decoded (image_loading ran there)."""
        if not self._accepting:
            raise Unavailable("the generation service is shutting down; retry shortly")
        if not image:
            raise InvalidArgument("image", "is required (the encoded picture's bytes)")
        if self.storage is not None:
            self.storage.check_admission()
        if request_id:
            existing = await self._by_request_id(request_id)
            if existing is not None:
                return _same_request(existing, payload_sha256, request_id)
        if len(self._queue) >= self.queue_limit:
            raise ResourceExhausted(
                f"queue full: {len(self._queue)} jobs waiting (limit {self.queue_limit}); retry later",
                retry_after_s=max(1.0, 2 * self._finish_interval_s),
            )
        record = _new_record(params, payload_sha256, loading_s, request_id, deadline, cancel_on_disconnect)
        position = len(self._queue) + 1
        events = _submit_events(record, loading_s, position)
        # The picture is on disk before the record says "queued", so a crash
        # in between never leaves a queued job without its input.
        await asyncio.to_thread(self.artifacts.write_input, record.id, image)
        try:
            stored, created = await self.store.insert(record, events)
        except BaseException:
            await asyncio.to_thread(self.artifacts.delete_input, record.id)
            raise
        if not created:  # the same request_id won a race with this one
            await asyncio.to_thread(self.artifacts.delete_input, record.id)
            return _same_request(stored, payload_sha256, request_id)
        metrics.record_stage("image_loading", loading_s)
        job = LiveJob(record=record, events=events, loaded=loaded, reported_position=position)
        self._live[record.id] = job
        self._queue.append(record.id)
        self._queue_changed.set()
        self._previous_arrival, self._last_arrival = self._last_arrival, time.monotonic()
        return record

    async def _by_request_id(self, request_id: str) -> JobRecord | None:
        for job in self._live.values():
            if job.record.request_id == request_id:
                return job.record
        return await self.store.get_by_request_id(request_id)

    async def get(self, job_id: str) -> tuple[JobRecord, int]:
        check_job_id(job_id)
        live = self._live.get(job_id)
        record = live.record if live else await self.store.get(job_id)
        if record is None:
            await self._not_found(job_id)
        return record, self.queue_position(job_id)

    async def _not_found(self, job_id: str) -> NoReturn:
        tombstone = await self.store.tombstone(job_id)
        if tombstone is not None:
            reason, at = tombstone
            when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
            raise NotFound(f"generation {job_id} expired at {when} ({reason}); its record and files are gone")
        raise NotFound(f"generation {job_id} not found")

    async def position(self, record: JobRecord) -> int:
        """The job's place in the queue (1: next), 0 when it is not queued."""
        return self.queue_position(record.id)

    async def positions(self, records: list[JobRecord]) -> list[int]:
        return [self.queue_position(r.id) for r in records]

    def queue_position(self, job_id: str) -> int:
        try:
            return self._queue.index(job_id) + 1
        except ValueError:
            return 0

    async def list(self, page_size: int, page_token: str, status: str | None) -> tuple[list[JobRecord], str]:
        if not 0 <= page_size <= 100:
            raise InvalidArgument("page_size", f"must be between 1 and 100, got {page_size}")
        page_size = page_size or 20
        before = _parse_page_token(page_token)
        records = await self.store.list_page(page_size + 1, before, status)
        records = [self._newer(r) for r in records]
        if len(records) > page_size:
            last = records[page_size - 1]
            return records[:page_size], f"{last.created_at!r}:{last.id}"
        return records, ""

    def _newer(self, record: JobRecord) -> JobRecord:
        live = self._live.get(record.id)
        return live.record if live is not None and live.record.version >= record.version else record

    async def cancel(self, job_id: str) -> JobRecord:
        """A queued job ends cancelled now; a running one gets a committed flag its worker obeys."""
        record, _ = await self.get(job_id)
        if record.terminal:
            return record
        change = Change(
            job_id,
            expect=lambda r: not r.terminal and not r.cancel_requested,
            change=_checked(lifecycle.request_cancel),
            event=lambda r: _terminal_event(r) if r.terminal else None,
        )
        (applied,) = await self.store.apply([change])
        if applied is None:  # already cancelled, or ended meanwhile: report what is stored
            return (await self.get(job_id))[0]
        self._published(applied)
        if applied.after.terminal:
            self._ended(applied.after)
            await self._report_queue_positions()
        return applied.after

    async def watch(self, job_id: str, after: int = 0) -> AsyncIterator[pb.GenerationEvent]:
        """Events after sequence `after`: the past ones, then live ones, to the terminal event."""
        await self.get(job_id)
        job = self._live.get(job_id)
        if job is None:
            for data in await self.store.events(job_id):
                event = _parse_event(data)
                if event.sequence > after:
                    yield event
            return
        sent = after
        while True:
            changed = job.changed
            pending = [e for e in job.events if e.sequence > sent]
            for event in pending:
                yield event
                sent = event.sequence
                if event.kind == pb.EVENT_KIND_TERMINAL:
                    return
            if pending:
                continue
            if self._closing:
                raise Unavailable(
                    f"the generation service is restarting; watch again to resume after event {sent}"
                )
            await changed.wait()

    async def result_file(self, job_id: str, fmt: str | None) -> tuple[str, str, str, str]:
        """(format, content type, file name, expected sha256) of a finished job's result.

        A job writes the format it asked for; another one is written from the job's
        source the first time it is asked for, then kept (checksummed) like the first."""
        record, _ = await self.get(job_id)
        if record.status != lifecycle.SUCCEEDED or record.result is None:
            raise FailedPrecondition(f"generation {job_id} has no result (status {record.status})")
        fmt = fmt or record.params["format"]
        digest = record.result["sha256"].get(fmt) or await self._write_format(job_id, fmt)
        extension = FILE_NAMES[fmt].split(".", 1)[1]
        return fmt, CONTENT_TYPES[fmt], f"{job_id}.{extension}", digest

    async def _write_format(self, job_id: str, fmt: str) -> str:
        lock = self._writing_formats.setdefault((job_id, fmt), asyncio.Lock())
        try:
            async with lock:
                record, _ = await self.get(job_id)  # another download may have written it meanwhile
                assert record.result is not None
                if fmt in record.result["sha256"]:
                    return record.result["sha256"][fmt]
                source_sha256 = record.result.get("source_sha256")
                if source_sha256 is None:
                    raise FailedPrecondition(f"generation {job_id} has no source to write {fmt} from")
                digest, size = await asyncio.to_thread(self._write_format_file, job_id, fmt, source_sha256)
                await self.store.record_artifact(job_id, fmt, digest, size)
                return digest
        finally:
            if not lock.locked():
                self._writing_formats.pop((job_id, fmt), None)

    def _write_format_file(self, job_id: str, fmt: str, source_sha256: str) -> tuple[str, int]:
        from services.generation.pipeline.mesh_export import write_from_source

        try:
            source = self.artifacts.read_source(job_id, source_sha256)
        except FileNotFoundError:
            raise NotFound(f"generation {job_id}: its result files are gone (the job expired)") from None
        except ChecksumMismatch as exc:
            raise DataLoss(f"the stored result is damaged ({exc}); generate it again") from None
        data = write_from_source(source, fmt)
        return self.artifacts.write_results(job_id, {fmt: data})[fmt], len(data)

    async def cutout_png(self, job_id: str) -> bytes:
        """What the model was given: the picture as decoded, its alpha the mask image_preprocessing chose,
        at the picture's own size (PNG)."""
        record, _ = await self.get(job_id)
        digest = (record.result or {}).get("cutout_sha256")
        if record.status != lifecycle.SUCCEEDED or digest is None:
            raise FailedPrecondition(f"generation {job_id} has no cut-out (status {record.status})")
        return await asyncio.to_thread(self._cutout_png, job_id, digest)

    def _cutout_png(self, job_id: str, digest: str) -> bytes:
        from services.generation.pipeline.image_loading import load_image

        try:
            picture, mask = self.artifacts.read_cutout(job_id, digest)
        except FileNotFoundError:
            raise NotFound(f"generation {job_id}: its result files are gone (the job expired)") from None
        except ChecksumMismatch as exc:
            raise DataLoss(f"the stored cut-out is damaged ({exc})") from None
        loaded = load_image(picture)
        rgba = loaded.rgba.copy()
        rgba[..., 3] = np.where(mask, 255, 0).astype(np.uint8)
        image = Image.fromarray(rgba, "RGBA")
        if image.size != loaded.size:  # a big picture was reduced for the pipeline: back to its own size
            image = image.resize(loaded.size, Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", compress_level=1)
        return buffer.getvalue()

    def read_result(self, job_id: str, fmt: str, expected_sha256: str) -> bytes:
        """The file's bytes, its checksum verified. Touches only the disk, so it may run in a thread."""
        try:
            return self.artifacts.read_result(job_id, fmt, expected_sha256)
        except FileNotFoundError:
            # Retention removes the record before the files: the job expired between the two reads.
            raise NotFound(f"generation {job_id}: its result files are gone (the job expired)") from None

    def counts(self) -> dict[str, int]:
        return {"queued": len(self._queue), "live": len(self._live)}

    # --- the worker's side -----------------------------------------------------------
    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running_count(self) -> int:
        return sum(1 for job in self._live.values() if job.record.status == lifecycle.RUNNING)

    @property
    def accepting(self) -> bool:
        return self._accepting

    def head_image_size(self) -> tuple[int, int]:
        if not self._queue:
            return (0, 0)
        loaded = self._live[self._queue[0]].loaded
        return loaded.size if loaded is not None else (0, 0)

    async def wait_for_work(self) -> LiveJob:
        """The job at the head of the queue, waiting until there is one (not removed)."""
        while True:
            await self._drop_expired()
            if self._queue:
                return self._live[self._queue[0]]
            self._queue_changed.clear()
            await self._queue_changed.wait()

    async def batch_window(self, max_size: int, max_delay_s: float) -> tuple[GenerationParams, int]:
        """Wait for a batch to fill: the head's parameters and how many compatible jobs wait.

        Returns as soon as max_size compatible jobs are queued, or when
        max_delay_s has passed since the head was found (the dynamic
        batcher's queue delay), whichever comes first.
        """
        head = await self.wait_for_work()
        key = head.params.batch_key()
        # Wait for company only while jobs are arriving: a lone request (none
        # came within the last window) starts at once instead of paying the
        # queue delay for a batch that is not coming.
        if time.monotonic() - self._previous_arrival > max_delay_s:
            max_delay_s = 0.0
        give_up_at = time.monotonic() + max_delay_s
        while True:
            waiting = sum(1 for j in self._queue if self._live[j].params.batch_key() == key)
            remaining = give_up_at - time.monotonic()
            if waiting >= max_size or remaining <= 0 or head.id not in self._queue:
                return head.params, max(1, waiting)
            self._queue_changed.clear()
            try:
                await asyncio.wait_for(self._queue_changed.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def take_batch(
        self, params: GenerationParams, size: int, claim_token: str, worker_id: str = "", device: str = ""
    ) -> list[LiveJob]:
        """Claim up to `size` queued jobs that can share a batch with `params`, oldest first.

        The claim commits queued -> running (one more attempt, the worker and its device) before any
        job leaves the queue; a job cancelled meanwhile is simply not claimed. Claims are taken one
        at a time (the lock), so with several workers a job goes to exactly one of them.
        """
        await self._drop_expired()
        key = params.batch_key()
        async with self._claiming:
            chosen = [self._live[j] for j in self._queue if self._live[j].params.batch_key() == key][:size]
            if not chosen:
                return []
            changes = [self._claim_change(job, claim_token, worker_id, device) for job in chosen]
            results = await self.store.apply(changes)
            claimed: list[LiveJob] = []
            for job, applied in zip(chosen, results):
                if applied is None:
                    continue
                self._remove_from_queue(job.id)
                job.publish(applied.after, applied.event)  # type: ignore[arg-type]
                metrics.record_queue_wait((applied.after.started_at or time.time()) - applied.after.created_at)
                claimed.append(job)
        if claimed:
            await self._report_queue_positions()
        return claimed

    def _claim_change(self, job: LiveJob, token: str, worker_id: str, device: str) -> Change:
        return _claim_change(job.id, job.loaded is not None, token, worker_id, device)

    async def emit_stage(
        self, job: LiveJob, stage: str, state: str, stage_progress: float, elapsed_s: float, detail: str = ""
    ) -> bool:
        """Commit a stage event of a running job; False when the job is no longer this claim's to move."""
        token = job.record.claim_token
        progress = convert.overall_progress(stage, stage_progress)
        completed = state == "completed"
        fields: dict[str, object] = dict(
            kind=pb.EVENT_KIND_STAGE,
            stage=convert.STAGE_ENUM[stage],
            state=convert.STATE_ENUM[state],
            stage_progress=stage_progress,
            elapsed_seconds=elapsed_s,
        )
        if detail:
            fields["detail"] = detail
        change = Change(
            job.id,
            expect=lambda r: r.status == lifecycle.RUNNING and r.claim_token == token,
            change=_checked(lambda r: lifecycle.stage(r, stage, progress, elapsed_s if completed else None)),
            event=lambda r: _event(r, **fields),
        )
        (applied,) = await self.store.apply([change])
        if applied is None:
            return False
        job.publish(applied.after, applied.event)  # type: ignore[arg-type]
        if completed:
            # Recorded where the event is made, so the histogram and what clients see agree.
            metrics.record_stage(stage, elapsed_s, applied.after.device)
        return True

    async def finish(
        self,
        job: LiveJob,
        status: str,
        result: dict | None = None,
        error: tuple[str, str] | None = None,
    ) -> bool:
        """End a running job (its claim's) or a queued one; False when it was not this caller's to end."""
        record = job.record
        change = self._finish_change(job.id, record.status, status, result, error, claim=record.claim_token)
        (applied,) = await self.store.apply([change])
        if applied is None:
            return False
        self._published(applied)
        self._ended(applied.after)
        return True

    def _finish_change(
        self,
        job_id: str,
        from_status: str,
        status: str,
        result: dict | None = None,
        error: tuple[str, str] | None = None,
        claim: str | None = None,
        any_claim: bool = False,
    ) -> Change:
        def expect(r: JobRecord) -> bool:
            return r.status == from_status and (any_claim or from_status != lifecycle.RUNNING or r.claim_token == claim)

        return Change(
            job_id,
            expect=expect,
            change=_checked(lambda r: lifecycle.finish(r, status, result=result, error=error)),
            event=_terminal_event,
        )

    async def retry_or_fail(self, job: LiveJob, code: str, message: str) -> bool:
        """After an infrastructure fault: back to the queue with the attempt counted, or, with no
        attempt left, failed with the fault's code. False when the job was not this claim's any more."""
        token = job.record.claim_token

        def change(r: JobRecord) -> JobRecord:
            if r.cancel_requested:
                return _cancel_instead_of_requeue(r, f"the fault that ended its run came first: {message}")
            if r.attempts >= self.max_attempts:
                return lifecycle.finish(r, lifecycle.FAILED, error=(code, f"{message} (after {r.attempts} attempts)"))
            return lifecycle.requeue(r, count_attempt=True, progress=_loaded_progress(r))

        (applied,) = await self.store.apply(
            [
                Change(
                    job.id,
                    expect=lambda r: r.status == lifecycle.RUNNING and r.claim_token == token,
                    change=_checked(change),
                    event=lambda r: _terminal_event(r) if r.terminal else _event(r, kind=pb.EVENT_KIND_QUEUED),
                )
            ]
        )
        if applied is None:
            return False
        self._published(applied)
        if applied.after.terminal:
            self._ended(applied.after)
        else:
            self._back_in_queue([job])
            log.warning(
                "infrastructure fault; the job goes back to the queue",
                extra={"job_id": job.id, "code": code, "attempts": applied.after.attempts, "error": message},
            )
        return True

    def _back_in_queue(self, jobs: list[LiveJob]) -> None:
        for job in jobs:
            job.loaded = None  # read again from disk: a requeued job may run anywhere, later
            job.abandoned = asyncio.Event()  # a fresh run, not the one the watchdog gave up on
            if job.id not in self._queue:
                self._queue.append(job.id)
        self._queue.sort(key=lambda i: (self._live[i].record.created_at, i))
        if jobs:
            self._queue_changed.set()

    async def requeue(self, jobs: list[LiveJob], count_attempt: bool) -> int:
        """Put running jobs back at the head of the queue (a graceful stop gives their attempt back); one
        whose cancel is pending ends cancelled instead. How many went back to the queue."""

        def change(r: JobRecord) -> JobRecord:
            if r.cancel_requested:
                return _cancel_instead_of_requeue(r, "the service stopped before the job could")
            return lifecycle.requeue(r, count_attempt=count_attempt, progress=_loaded_progress(r))

        changes = []
        for job in jobs:
            token = job.record.claim_token
            changes.append(
                Change(
                    job.id,
                    expect=lambda r, token=token: r.status == lifecycle.RUNNING and r.claim_token == token,
                    change=_checked(change),
                    event=lambda r: _terminal_event(r) if r.terminal else _event(r, kind=pb.EVENT_KIND_QUEUED),
                )
            )
        if not changes:
            return 0
        results = await self.store.apply(changes)
        done = [(job, applied) for job, applied in zip(jobs, results) if applied is not None]
        for job, applied in done:
            job.publish(applied.after, applied.event)  # type: ignore[arg-type]
            if applied.after.terminal:
                self._ended(applied.after)
        requeued = [job for job, applied in done if not applied.after.terminal]
        self._back_in_queue(requeued)
        return len(requeued)

    # --- internals -------------------------------------------------------------------
    def _published(self, applied: Applied) -> None:
        job = self._live.get(applied.after.id)
        if job is not None:
            job.publish(applied.after, applied.event)  # type: ignore[arg-type]

    def _ended(self, record: JobRecord) -> None:
        """After a committed terminal transition: forget the live job, count it, drop its input."""
        self._remove_from_queue(record.id)
        self._live.pop(record.id, None)
        finished_at = record.finished_at or time.time()
        metrics.record_job_finished(record.status, record.error_code, finished_at - record.created_at)
        if self._last_finish:
            interval = min(10.0, finished_at - self._last_finish)  # an idle spell is not a slow queue
            self._finish_interval_s = 0.8 * self._finish_interval_s + 0.2 * interval
        self._last_finish = finished_at
        # A succeeded job keeps its picture beside its results (its cut-out is shown on it); the others' goes.
        keep = record.status == lifecycle.SUCCEEDED
        self.tasks.spawn(
            asyncio.to_thread(self.artifacts.keep_input if keep else self.artifacts.delete_input, record.id),
            "keep-input" if keep else "delete-input",
        )

    def _remove_from_queue(self, job_id: str) -> None:
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._queue_changed.set()

    async def _deadline_loop(self) -> None:
        """End queued jobs whose deadline passes, even while the worker is busy."""
        while True:
            deadlines = [d for j in self._queue if (d := self._live[j].record.deadline) is not None]
            self._queue_changed.clear()
            if not deadlines:
                await self._queue_changed.wait()
                continue
            try:
                await asyncio.wait_for(self._queue_changed.wait(), max(0.0, min(deadlines) - time.time()))
            except asyncio.TimeoutError:
                pass
            try:
                await self._drop_expired()
            except Exception:  # noqa: BLE001 - a store error now is retried at the next wake-up
                log.exception("ending queued jobs past their deadline failed; retrying")
                await asyncio.sleep(1.0)

    async def _drop_expired(self) -> None:
        """A job whose deadline passed in the queue is never started."""
        now = time.time()
        expired = [self._live[j] for j in self._queue if self._live[j].expired(now)]
        if not expired:
            return
        error = ("DEADLINE_EXCEEDED", "deadline exceeded while the job waited in the queue")
        results = await self.store.apply(
            [self._finish_change(job.id, lifecycle.QUEUED, lifecycle.FAILED, error=error) for job in expired]
        )
        for applied in results:
            if applied is not None:
                self._published(applied)
                self._ended(applied.after)
        await self._report_queue_positions()

    async def _report_queue_positions(self) -> None:
        """A queued event for every waiting job whose place moved, so followers see the queue advance."""
        moved = [
            (self._live[job_id], position)
            for position, job_id in enumerate(self._queue, start=1)
            if self._live[job_id].reported_position != position
        ]
        if not moved:
            return
        changes = [
            Change(
                job.id,
                expect=lambda r: r.status == lifecycle.QUEUED,
                change=_checked(lifecycle.note),
                event=lambda r, position=position: _event(r, kind=pb.EVENT_KIND_QUEUED, queue_position=position),
            )
            for job, position in moved
        ]
        for (job, position), applied in zip(moved, await self.store.apply(changes)):
            if applied is not None:
                job.reported_position = position
                job.publish(applied.after, applied.event)  # type: ignore[arg-type]


def _new_record(
    params: GenerationParams,
    payload_sha256: str,
    loading_s: float,
    request_id: str,
    deadline: float | None,
    cancel_on_disconnect: bool,
) -> JobRecord:
    """A job as admission queues it: its picture decoded (image_loading ran there)."""
    return JobRecord(
        id=uuid.uuid4().hex,
        status=lifecycle.QUEUED,
        params=params.to_dict(),
        payload_sha256=payload_sha256,
        created_at=time.time(),
        request_id=request_id or None,
        deadline=deadline,
        cancel_on_disconnect=cancel_on_disconnect,
        stage="image_loading",
        stage_timings={"image_loading": loading_s},
        progress=convert.overall_progress("image_loading", 1.0),
        version=1,
    )


def _submit_events(record: JobRecord, loading_s: float, position: int) -> list[pb.GenerationEvent]:
    """A new job's first events: image_loading started and completed (at admission), then queued."""
    loading = convert.STAGE_ENUM["image_loading"]
    return [
        _event(record, kind=pb.EVENT_KIND_STAGE, stage=loading, state=convert.STATE_ENUM["started"], progress=0.0),
        _event(
            record,
            kind=pb.EVENT_KIND_STAGE,
            stage=loading,
            state=convert.STATE_ENUM["completed"],
            stage_progress=1.0,
            elapsed_seconds=loading_s,
        ),
        _event(record, kind=pb.EVENT_KIND_QUEUED, queue_position=position),
    ]


def _cancel_instead_of_requeue(record: JobRecord, why: str) -> JobRecord:
    """A running job whose client asked to cancel it, interrupted before it could stop on its own, ends
    cancelled: queued again it would carry a cancel that no claim takes (claims skip cancelled jobs) and
    that only ends queued jobs when it is asked, so it would wait in the queue for ever."""
    return lifecycle.finish(record, lifecycle.CANCELLED, error=(lifecycle.CANCELLED_CODE, f"cancelled by the client ({why})"))


def _claim_change(job_id: str, loaded: bool, token: str, worker_id: str, device: str) -> Change:
    """queued -> running for this worker; the first stage the worker runs starts with the claim, in its
    transaction (image_preprocessing when admission's decoded picture is at hand, else image_loading)."""
    first = "image_preprocessing" if loaded else "image_loading"
    progress = convert.overall_progress(first, 0.0)
    return Change(
        job_id,
        expect=lambda r: r.status == lifecycle.QUEUED and not r.cancel_requested,
        change=_checked(
            lambda r: lifecycle.claim(r, token, first, progress, worker_id=worker_id or None, device=device or None)
        ),
        event=lambda r: _event(
            r, kind=pb.EVENT_KIND_STAGE, stage=convert.STAGE_ENUM[first], state=convert.STATE_ENUM["started"]
        ),
    )


def _checked(change: Callable[[JobRecord], JobRecord]) -> Callable[[JobRecord], JobRecord]:
    """A transition, with the state machine's check on what it produced."""

    def run(before: JobRecord) -> JobRecord:
        after = change(before)
        lifecycle.check(before, after)
        return after

    return run


def _loaded_progress(record: JobRecord) -> float:
    return convert.overall_progress("image_loading", 1.0) if "image_loading" in record.stage_timings else 0.0


def _event(record: JobRecord, **fields: object) -> pb.GenerationEvent:
    """An event about `record` as committed; the store numbers it."""
    fields.setdefault("progress", record.progress)
    return pb.GenerationEvent(
        generation_id=record.id,
        time=convert.event_time(time.time()),
        **fields,  # type: ignore[arg-type]
    )


def _terminal_event(record: JobRecord) -> pb.GenerationEvent:
    return _event(record, kind=pb.EVENT_KIND_TERMINAL, outcome=convert.outcome_message(record))


def _same_request(existing: JobRecord, payload_sha256: str, request_id: str) -> JobRecord:
    if existing.payload_sha256 != payload_sha256:
        raise AlreadyExists(f"request_id: {request_id!r} was already used for a different request")
    return existing


def _parse_event(data: bytes) -> pb.GenerationEvent:
    event = pb.GenerationEvent()
    event.ParseFromString(data)
    return event


def _parse_page_token(token: str) -> tuple[float, str] | None:
    if not token:
        return None
    try:
        created, job_id = token.rsplit(":", 1)
        return float(created), check_job_id(job_id)
    except (ValueError, InvalidArgument):
        raise InvalidArgument("page_token", "is not a token from a previous response") from None
