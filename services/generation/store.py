"""What the rest of the service knows of the job store: the records, the transitions, and one interface.

Two implementations keep jobs and their events: SQLite under DATA_DIR
(job_store.py, one instance, the default) and PostgreSQL (pg_store.py, any
number of instances, when GENERATION_DATABASE_URL is set). Both commit a
job's change together with the event that reports it, in one transaction;
the job manager and the retention sweeper see only `JobStore` below.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.errors import Unavailable

ACTIVE_STATUSES = ("queued", "running")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


class StoreUnavailable(Unavailable):
    """The job database cannot take a write now (locked by another process, unreachable, or the disk is full)."""

    def __init__(self, message: str, disk_full: bool = False) -> None:
        super().__init__(f"storage: {message}")
        self.disk_full = disk_full


@dataclass
class JobRecord:
    id: str
    status: str  # queued, running, succeeded, failed, cancelled (see lifecycle.py)
    params: dict[str, Any]
    payload_sha256: str
    created_at: float
    request_id: str | None = None
    stage: str = ""
    progress: float = 0.0
    stage_timings: dict[str, float] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 0
    deadline: float | None = None
    cancel_on_disconnect: bool = False
    started_at: float | None = None
    finished_at: float | None = None
    cancel_requested: bool = False
    # Set while a worker runs the job: only that claim may move it on.
    claim_token: str | None = None
    # Bumped by every committed change.
    version: int = 0
    # The worker that claimed the job and its device ("cuda:1", "cpu"); kept once it ends, so a
    # finished job says where it ran. None while queued.
    worker_id: str | None = None
    device: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


class Event(Protocol):
    """What the store needs of an event (a GenerationEvent): its number, and its bytes."""

    sequence: int

    def SerializeToString(self) -> bytes: ...


@dataclass
class Change:
    """One job's transition: applied only when `expect` holds for the committed record.

    `change` returns the next record (or None for "nothing to do"); `event`
    makes the event that reports it, numbered by the store.
    """

    job_id: str
    expect: Callable[[JobRecord], bool]
    change: Callable[[JobRecord], JobRecord | None]
    event: Callable[[JobRecord], Event | None] | None = None


@dataclass
class Applied:
    before: JobRecord
    after: JobRecord
    event: Event | None


class JobStore(Protocol):
    """The durable jobs, their events and the tombstones of expired ones."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    # --- writes: each one transaction ---
    async def insert(self, record: JobRecord, events: Sequence[Event]) -> tuple[JobRecord, bool]:
        """A new job with its first events; with a request_id already used, that job and False."""

    async def apply(self, changes: Sequence[Change]) -> list[Applied | None]:
        """Every change in one transaction; None where a job's expectation did not hold."""

    async def record_artifact(self, job_id: str, fmt: str, sha256: str, size: int) -> bool: ...

    async def expire(self, job_id: str, reason: str, at: float) -> bool: ...

    # --- reads ---
    async def get(self, job_id: str) -> JobRecord | None: ...

    async def get_by_request_id(self, request_id: str) -> JobRecord | None: ...

    async def list_page(self, limit: int, before: tuple[float, str] | None, status: str | None) -> list[JobRecord]: ...

    async def active(self) -> list[JobRecord]: ...

    async def finished_before(self, older_than: float) -> list[str]: ...

    async def finished_oldest_first(self) -> list[tuple[str, float]]: ...

    async def known_ids(self, ids: Sequence[str]) -> set[str]: ...

    async def tombstone(self, job_id: str) -> tuple[str, float] | None: ...

    async def events(self, job_id: str, after: int = 0) -> list[bytes]:
        """The job's events after sequence `after`, in order, serialised."""

    async def counts(self) -> dict[str, int]: ...
