"""The job manager: accepts jobs, keeps the queue, publishes events.

This is the model object the gRPC servicer delegates to, and the worker's
source of batches. State lives in the JobStore (durable) and, for jobs still
in flight, in LiveJob objects whose event list watchers follow.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pb.orfeas.generation.v1 import generation_pb2 as pb
from services.common import metrics
from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from services.generation import convert
from services.generation.artifacts import CONTENT_TYPES, FILE_NAMES, ArtifactStore, check_job_id
from services.generation.job_store import JobRecord, JobStore
from services.generation.pipeline.params import GenerationParams
from services.generation.pipeline.records import LoadedImage

log = logging.getLogger(__name__)

# Reasons a job ends other than success, as Error.code.
INTERRUPTED = "interrupted"


@dataclass
class LiveJob:
    """A job that is queued or running, with the events watchers follow."""

    record: JobRecord
    events: list[pb.GenerationEvent] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    cancel_requested: bool = False
    # The decoded picture from admission, so the worker need not decode it
    # again; None after a restart, when the worker loads it from disk.
    loaded: LoadedImage | None = None
    # The queue position the last queued event told watchers (0: none yet).
    reported_position: int = 0

    @property
    def id(self) -> str:
        return self.record.id

    @property
    def params(self) -> GenerationParams:
        return GenerationParams(**self.record.params)

    def expired(self, at: float | None = None) -> bool:
        deadline = self.record.deadline
        return deadline is not None and (at or time.time()) >= deadline


class JobManager:
    def __init__(self, store: JobStore, artifacts: ArtifactStore, queue_limit: int, max_attempts: int) -> None:
        self.store = store
        self.artifacts = artifacts
        self.queue_limit = queue_limit
        self.max_attempts = max_attempts
        self._live: dict[str, LiveJob] = {}
        self._queue: list[str] = []  # ids of queued jobs, in order
        self._queue_changed = asyncio.Event()
        self._accepting = True
        # Seconds between two jobs finishing, smoothed: a full queue frees a
        # place about that often, so it is the retry delay quoted to clients.
        self._finish_interval_s = 1.0
        self._last_finish = 0.0
        # When the last two jobs arrived (monotonic): the batch window waits only during a burst.
        self._last_arrival = self._previous_arrival = float("-inf")

    # --- start-up ---------------------------------------------------------
    def recover(self) -> dict[str, int]:
        """Requeue what a crash left queued or running; fail what ran too often."""
        counts = {"requeued": 0, "interrupted": 0}
        for record in self.store.active():
            if record.status == "running":
                if record.attempts >= self.max_attempts:
                    record.status = "failed"
                    record.error_code = INTERRUPTED
                    record.error_message = (
                        f"interrupted: the service stopped while the job ran, {record.attempts} times"
                    )
                    record.finished_at = time.time()
                    self.store.update(record)
                    job = self._load_live(record)
                    self._append_terminal(job)
                    counts["interrupted"] += 1
                    continue
                record.status = "queued"
                record.stage = ""
                record.progress = 0.0
                record.stage_timings = {}
                self.store.update(record)
            job = self._load_live(record)
            self._live[job.id] = job
            self._queue.append(job.id)
            self._watch_deadline(job)
            counts["requeued"] += 1
        if self._queue:
            self._queue_changed.set()
            self._record_queue_positions()  # nobody watches yet: record, no one to wake
        return counts

    def _load_live(self, record: JobRecord) -> LiveJob:
        job = LiveJob(record=record)
        job.events = [_parse_event(b) for b in self.store.events(record.id)]
        return job

    # --- the public operations ---------------------------------------------
    def submit(
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
        payload = payload_sha256
        if request_id:
            existing = self.store.get_by_request_id(request_id)
            if existing is not None:
                if existing.payload_sha256 != payload:
                    raise AlreadyExists(
                        f"request_id: {request_id!r} was already used for a different request"
                    )
                return existing
        if len(self._queue) >= self.queue_limit:
            raise ResourceExhausted(
                f"queue full: {len(self._queue)} jobs waiting (limit {self.queue_limit}); retry later",
                retry_after_s=max(1.0, 2 * self._finish_interval_s),
            )
        record = JobRecord(
            id=uuid.uuid4().hex,
            status="queued",
            params=params.to_dict(),
            payload_sha256=payload,
            created_at=time.time(),
            request_id=request_id or None,
            deadline=deadline,
            cancel_on_disconnect=cancel_on_disconnect,
        )
        # The picture is on disk before the record says "queued", so a crash
        # in between never leaves a queued job without its input.
        self.artifacts.write_input(record.id, image)
        self.store.insert(record)
        record.stage = "image_loading"
        record.stage_timings["image_loading"] = loading_s
        metrics.record_stage("image_loading", loading_s)
        record.progress = convert.overall_progress("image_loading", 1.0)
        self.store.update(record)
        job = LiveJob(record=record, loaded=loaded)
        stage = convert.STAGE_ENUM["image_loading"]
        self._append(job, kind=pb.EVENT_KIND_STAGE, stage=stage, state=convert.STATE_ENUM["started"])
        self._append(
            job,
            kind=pb.EVENT_KIND_STAGE,
            stage=stage,
            state=convert.STATE_ENUM["completed"],
            stage_progress=1.0,
            elapsed_seconds=loading_s,
        )
        self._live[record.id] = job
        self._queue.append(record.id)
        self._queue_changed.set()
        self._previous_arrival, self._last_arrival = self._last_arrival, time.monotonic()
        job.reported_position = len(self._queue)
        self._append(job, kind=pb.EVENT_KIND_QUEUED, queue_position=job.reported_position)
        self._watch_deadline(job)
        return record

    def get(self, job_id: str) -> tuple[JobRecord, int]:
        check_job_id(job_id)
        live = self._live.get(job_id)
        record = live.record if live else self.store.get(job_id)
        if record is None:
            tombstone = self.store.tombstone(job_id)
            if tombstone is not None:
                reason, at = tombstone
                when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(at))
                raise NotFound(f"generation {job_id} expired at {when} ({reason}); its record and files are gone")
            raise NotFound(f"generation {job_id} not found")
        return record, self.queue_position(job_id)

    def queue_position(self, job_id: str) -> int:
        try:
            return self._queue.index(job_id) + 1
        except ValueError:
            return 0

    def list(self, page_size: int, page_token: str, status: str | None) -> tuple[list[JobRecord], str]:
        if not 0 <= page_size <= 100:
            raise InvalidArgument("page_size", f"must be between 1 and 100, got {page_size}")
        page_size = page_size or 20
        before = _parse_page_token(page_token)
        records = self.store.list_page(page_size + 1, before, status)
        records = [self._live[r.id].record if r.id in self._live else r for r in records]
        if len(records) > page_size:
            last = records[page_size - 1]
            return records[:page_size], f"{last.created_at!r}:{last.id}"
        return records, ""

    async def cancel(self, job_id: str) -> JobRecord:
        record, _ = self.get(job_id)
        job = self._live.get(job_id)
        if job is None or record.terminal:
            return record
        if record.status == "queued":
            self._remove_from_queue(job_id)
            await self.finish(job, "cancelled", error=("CANCELLED", "cancelled by the client while queued"))
            await self._report_queue_positions()
        else:
            # The worker stops it at the next stage boundary; batch-mates run on.
            job.cancel_requested = True
        return job.record

    async def watch(self, job_id: str) -> AsyncIterator[pb.GenerationEvent]:
        record, _ = self.get(job_id)
        job = self._live.get(job_id)
        if job is None:
            for data in self.store.events(job_id):
                yield _parse_event(data)
            return
        sent = 0
        while True:
            async with job.changed:
                await job.changed.wait_for(lambda: len(job.events) > sent)
                pending = job.events[sent:]
            for event in pending:
                yield event
            sent += len(pending)
            if pending[-1].kind == pb.EVENT_KIND_TERMINAL:
                return

    def result_file(self, job_id: str, fmt: str | None) -> tuple[str, str, str, str]:
        """(format, content type, file name, expected sha256) of a finished job's result."""
        record, _ = self.get(job_id)
        if record.status != "succeeded" or record.result is None:
            raise FailedPrecondition(f"generation {job_id} has no result (status {record.status})")
        fmt = fmt or record.params["format"]
        extension = FILE_NAMES[fmt].split(".", 1)[1]
        return fmt, CONTENT_TYPES[fmt], f"{job_id}.{extension}", record.result["sha256"][fmt]

    def read_result(self, job_id: str, fmt: str, expected_sha256: str) -> bytes:
        """The file's bytes, its checksum verified. Touches only the disk, so it may run in a thread."""
        return self.artifacts.read_result(job_id, fmt, expected_sha256)

    def counts(self) -> dict[str, int]:
        return {"queued": len(self._queue), "live": len(self._live)}

    # --- the worker's side -----------------------------------------------------
    def stop_accepting(self) -> None:
        self._accepting = False

    @property
    def queue_length(self) -> int:
        return len(self._queue)

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

    async def take_batch(self, params: GenerationParams, size: int) -> list[LiveJob]:
        """Remove and return up to `size` queued jobs that can share a batch with `params`, oldest first."""
        await self._drop_expired()
        key = params.batch_key()
        chosen = [j for j in self._queue if self._live[j].params.batch_key() == key][:size]
        for job_id in chosen:
            self._queue.remove(job_id)
        if chosen:
            self._queue_changed.set()
            await self._report_queue_positions()
        return [self._live[j] for j in chosen]

    async def mark_running(self, job: LiveJob) -> None:
        job.record.status = "running"
        job.record.started_at = time.time()
        metrics.record_queue_wait(job.record.started_at - job.record.created_at)
        job.record.attempts += 1
        self.store.update(job.record)

    async def emit_stage(
        self, job: LiveJob, stage: str, state: str, stage_progress: float, elapsed_s: float
    ) -> None:
        record = job.record
        record.stage = stage
        record.progress = convert.overall_progress(stage, stage_progress)
        if state == "completed":
            # Recorded where the event is made, so the histogram and what clients see agree.
            metrics.record_stage(stage, elapsed_s)
            record.stage_timings[stage] = elapsed_s
        async with job.changed:
            with self.store.transaction():
                if state in ("started", "completed", "failed"):
                    self.store.update(record)
                self._next_event(
                    job,
                    kind=pb.EVENT_KIND_STAGE,
                    stage=convert.STAGE_ENUM[stage],
                    state=convert.STATE_ENUM[state],
                    stage_progress=stage_progress,
                    elapsed_seconds=elapsed_s,
                )
            job.changed.notify_all()

    async def finish(
        self,
        job: LiveJob,
        status: str,
        result: dict | None = None,
        error: tuple[str, str] | None = None,
    ) -> None:
        record = job.record
        record.status = status
        record.finished_at = time.time()
        metrics.record_job_finished(status, error[0] if error else None, record.finished_at - record.created_at)
        if status == "succeeded":
            record.progress = 1.0
            record.result = result
        if error is not None:
            record.error_code, record.error_message = error
        if self._last_finish:
            interval = min(10.0, record.finished_at - self._last_finish)  # an idle spell is not a slow queue
            self._finish_interval_s = 0.8 * self._finish_interval_s + 0.2 * interval
        self._last_finish = record.finished_at
        async with job.changed:
            with self.store.transaction():
                self.store.update(record)
                self._append_terminal(job)
            job.changed.notify_all()
        self._live.pop(job.id, None)
        # Results are all that is kept of a finished job; its input can go.
        self.artifacts.delete_input(job.id)

    # --- internals -------------------------------------------------------------
    def _remove_from_queue(self, job_id: str) -> None:
        if job_id in self._queue:
            self._queue.remove(job_id)
            self._queue_changed.set()

    def _watch_deadline(self, job: LiveJob) -> None:
        """End the job when its deadline passes while it is still queued, even if the worker is busy."""
        if job.record.deadline is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, job.record.deadline - time.time())
        loop.call_later(delay, lambda: loop.create_task(self._drop_expired()))

    async def _drop_expired(self) -> None:
        """A job whose deadline passed in the queue is never started."""
        now = time.time()
        expired = [j for j in self._queue if self._live[j].expired(now)]
        for job_id in expired:
            self._remove_from_queue(job_id)
            await self.finish(
                self._live[job_id],
                "failed",
                error=("DEADLINE_EXCEEDED", "deadline exceeded while the job waited in the queue"),
            )
        if expired:
            await self._report_queue_positions()

    async def _report_queue_positions(self) -> None:
        """A queued event for every waiting job whose place moved, so followers see the queue advance."""
        for job in self._record_queue_positions():
            async with job.changed:
                job.changed.notify_all()

    def _record_queue_positions(self) -> list[LiveJob]:
        moved = [
            (self._live[job_id], position)
            for position, job_id in enumerate(self._queue, start=1)
            if self._live[job_id].reported_position != position
        ]
        if moved:
            with self.store.transaction():
                for job, position in moved:
                    job.reported_position = position
                    self._next_event(job, kind=pb.EVENT_KIND_QUEUED, queue_position=position)
        return [job for job, _ in moved]

    def _next_event(self, job: LiveJob, **fields: object) -> pb.GenerationEvent:
        now = time.time()
        event = pb.GenerationEvent(
            generation_id=job.id,
            sequence=len(job.events) + 1,
            progress=job.record.progress,
            time=convert.event_time(now),
            **fields,  # type: ignore[arg-type]
        )
        job.events.append(event)
        self.store.append_event(job.id, event.sequence, event.SerializeToString())
        return event

    def _append(self, job: LiveJob, **fields: object) -> None:
        """Record an event without waking watchers (none can exist yet)."""
        self._next_event(job, **fields)

    def _append_terminal(self, job: LiveJob) -> None:
        self._next_event(job, kind=pb.EVENT_KIND_TERMINAL, outcome=convert.outcome_message(job.record))


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
