"""A job's life-cycle: one small state machine.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
      │  ▲              │
      │  └──requeue─────┘   (recovery after a crash, or a graceful stop)
      └──cancel / deadline──▶ cancelled | failed

Every change is a pure function from the committed record to the next one;
the store applies it inside one transaction together with the event that
reports it (store.py: SQLite or PostgreSQL), and only then do memory, watchers and metrics
learn of it (jobs.py). Terminal states are final: no transition leaves them
and no event follows the terminal one.
"""
from __future__ import annotations

import dataclasses
import time

from services.generation.store import JobRecord

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})

# status -> the statuses it may move to (staying put is a change of stage, progress or flags).
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({QUEUED, RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({RUNNING, QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}

# Error codes of the reasons a job ends without a result.
INTERRUPTED = "interrupted"
CANCELLED_CODE = "CANCELLED"


class IllegalTransition(RuntimeError):
    """A bug: code asked for a move the state machine does not have."""


def check(before: JobRecord, after: JobRecord) -> None:
    if after.status not in ALLOWED[before.status]:
        raise IllegalTransition(f"job {before.id}: {before.status} -> {after.status} is not a transition")


def _next(record: JobRecord, **changes: object) -> JobRecord:
    return dataclasses.replace(record, version=record.version + 1, **changes)  # type: ignore[arg-type]


def claim(
    record: JobRecord,
    token: str,
    first_stage: str,
    progress: float,
    now: float | None = None,
    worker_id: str | None = None,
    device: str | None = None,
) -> JobRecord:
    """queued -> running: a worker takes the job; one more attempt is counted, and which worker and
    device run it is recorded with the claim."""
    return _next(
        record,
        status=RUNNING,
        claim_token=token,
        attempts=record.attempts + 1,
        started_at=now or time.time(),
        stage=first_stage,
        progress=progress,
        worker_id=worker_id,
        device=device,
    )


def stage(record: JobRecord, name: str, progress: float, elapsed_s: float | None) -> JobRecord:
    """running -> running: a stage moved on; elapsed_s is set when it completed."""
    timings = dict(record.stage_timings)
    if elapsed_s is not None:
        timings[name] = elapsed_s
    return _next(record, stage=name, progress=progress, stage_timings=timings)


def note(record: JobRecord) -> JobRecord:
    """No change of state, only an event about it (a queued job's place moved)."""
    return _next(record)


def request_cancel(record: JobRecord, now: float | None = None) -> JobRecord:
    """A queued job ends cancelled at once; a running one carries the flag its worker checks at every step."""
    if record.status == QUEUED:
        return finish(record, CANCELLED, error=(CANCELLED_CODE, "cancelled by the client while queued"), now=now)
    return _next(record, cancel_requested=True)


def finish(
    record: JobRecord,
    status: str,
    result: dict | None = None,
    error: tuple[str, str] | None = None,
    now: float | None = None,
) -> JobRecord:
    if status not in TERMINAL:
        raise IllegalTransition(f"finish needs a terminal status, got {status}")
    return _next(
        record,
        status=status,
        finished_at=now or time.time(),
        claim_token=None,
        progress=1.0 if status == SUCCEEDED else record.progress,
        result=result if status == SUCCEEDED else None,
        error_code=error[0] if error else None,
        error_message=error[1] if error else None,
    )


def requeue(record: JobRecord, count_attempt: bool, progress: float) -> JobRecord:
    """running -> queued. A crash counts the attempt it interrupted; a graceful stop gives it back.

    What the job did is forgotten but for image_loading, whose picture is still on disk; so is the
    worker, since any worker may take it next.
    """
    loaded = "image_loading" in record.stage_timings
    return _next(
        record,
        status=QUEUED,
        claim_token=None,
        attempts=record.attempts if count_attempt else max(0, record.attempts - 1),
        stage="image_loading" if loaded else "",
        progress=progress,
        stage_timings={"image_loading": record.stage_timings["image_loading"]} if loaded else {},
        started_at=None,
        worker_id=None,
        device=None,
    )
